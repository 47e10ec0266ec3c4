"""Server-side SVG charts of the network's activity: numbers and our own labels only,
so nothing a node or user sent can reach the markup."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

from markupsafe import Markup

from ledger.store import Connection
from routecat.db import jobs as jobs_db


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """About ``count`` round steps (1, 2, 2.5 or 5 times a power of ten) from 0 to at
    least ``top``: the y axis's values and gridlines."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def compact(value: float) -> str:
    """1234 -> "1.2k", 3500000 -> "3.5M": tick labels that fit beside the axis."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:g}"


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str) -> Markup:
    """A server-side SVG bar chart with a y axis (round values, gridlines) and time labels
    under the bars (every few bars, so they stay readable). Only numbers and our own
    labels go in."""
    width, height = 640, 220
    left, right, top_pad, bottom = 52, 12, 28, 30
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    ticks = nice_ticks(max(values, default=0))
    ceiling = ticks[-1]
    base = top_pad + plot_h
    parts = [f'<text class="title" x="{left}" y="16">{Markup.escape(title)}</text>']
    for tick in ticks:
        y = base - plot_h * tick / ceiling
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"'
            ' stroke="currentColor" stroke-opacity="0.15"/>'
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{compact(tick)}</text>"
        )
    step = plot_w / max(1, len(values))
    every = max(1, math.ceil(len(values) / 8))  # at most 8 time labels
    for i, value in enumerate(values):
        h = plot_h * value / ceiling
        x = left + i * step
        label = Markup.escape(labels[i])
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{base - h:.1f}" width="{max(1.0, step - 2):.1f}"'
            f' height="{h:.1f}"><title>{label}: {value:,g}</title></rect>'
        )
        if i % every == 0:
            parts.append(
                f'<text class="when" x="{x + step / 2:.1f}" y="{height - 10}"'
                f' text-anchor="middle">{label}</text>'
            )
    parts.append(
        f'<line class="axis" x1="{left}" x2="{width - right}" y1="{base}" y2="{base}"'
        ' stroke="currentColor" stroke-opacity="0.5"/>'
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top_pad}" y2="{base}"'
        ' stroke="currentColor" stroke-opacity="0.5"/>'
    )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img"'
        f' aria-label="{Markup.escape(title)}">' + "".join(parts) + "</svg>"
    )


def series(
    db: Connection, since: datetime, buckets: int, hours_per_bucket: int
) -> tuple[list[int], list[int], list[str]]:
    width = 13 if hours_per_bucket == 1 else 10  # "YYYY-MM-DDTHH" or "YYYY-MM-DD"
    found = jobs_db.activity_by_bucket(db, since.strftime("%Y-%m-%dT%H:%M:%S"), width)
    jobs, tokens, labels = [], [], []
    for i in range(buckets):
        moment = since + timedelta(hours=hours_per_bucket * (i + 1))
        key = (
            moment.strftime("%Y-%m-%dT%H") if hours_per_bucket == 1 else moment.strftime("%Y-%m-%d")
        )
        bucket = found.get(key, jobs_db.Activity(0, 0))
        jobs.append(bucket.jobs)
        tokens.append(bucket.tokens)
        labels.append(
            moment.strftime("%H:00") if hours_per_bucket == 1 else moment.strftime("%b %d")
        )
    return jobs, tokens, labels
