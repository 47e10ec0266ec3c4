"""Server-side SVG charts of the network's activity: numbers and our own labels only,
so nothing a node or user sent can reach the markup."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from markupsafe import Markup

from ledger.store import Connection
from routecat.db import jobs as jobs_db


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str) -> Markup:
    """A small server-side SVG bar chart; only numbers and our own labels go in."""
    width, height, pad = 640, 180, 24
    top = max(values) if values and max(values) > 0 else 1
    step = (width - 2 * pad) / max(1, len(values))
    bars = []
    for i, value in enumerate(values):
        h = (height - 2 * pad) * value / top
        x = pad + i * step
        bars.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(1.0, step - 2):.1f}"'
            f' height="{h:.1f}"><title>{Markup.escape(labels[i])}: {value:g}</title></rect>'
        )
    first = Markup.escape(labels[0]) if labels else ""
    last = Markup.escape(labels[-1]) if labels else ""
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{Markup.escape(title)}">'
        f'<text x="{pad}" y="14">{Markup.escape(title)} (max {top:g})</text>'
        + "".join(bars)
        + f'<text x="{pad}" y="{height - 6}">{first}</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{last}</text></svg>'
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
