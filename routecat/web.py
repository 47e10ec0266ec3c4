"""The gateway's own website: account, pricing, network, audit, providers, docs.

Invariants: every value that comes from nodes or users is escaped (Jinja autoescape;
charts are built from numbers only); a Content-Security-Policy forbids inline script
and every remote origin, so nothing is loaded from a CDN and injected markup cannot
run; an API key never appears in a URL (the account page sends it in the
``Authorization`` header and keeps it in memory unless the user asks to remember it);
a node secret is only ever sent in a POST body.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import segno
from markupsafe import Markup
from quart import Blueprint, Response, render_template, request

from ledger import book
from routecat import errors
from routecat.app import audit_page, gw_stats, model_list, remote_ip
from routecat.db import jobs as jobs_db
from routecat.db import nodes as nodes_db
from routecat.db import payouts as payouts_db
from routecat.gateway import Gateway
from routecat.network.registry import hash_secret

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)


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
    db: Any, since: datetime, buckets: int, hours_per_bucket: int
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


def node_summary(db: Any, node_id: str, now: float) -> dict[str, Any] | None:
    node = nodes_db.node(db, node_id)
    if node is None:
        return None
    account = book.provider_account(node_id)
    balance, _ = book.balance(db, account)
    held = book.held(db, account, now)
    totals = jobs_db.node_totals(db, node_id)
    payouts = payouts_db.recent(db, 50, node_id)
    # The totals over every payout (the list below shows only the latest 50).
    sums = payouts_db.totals(db, node_id)
    paid, pending = sums.paid_msat, sums.pending_msat
    return {
        "id": node.id,
        "name": node.name,
        "since": node.created_at[:10],
        "last_seen": node.last_seen_at[:19].replace("T", " "),
        "jobs": totals.jobs,
        "tokens_in": totals.tokens_in,
        "tokens_out": totals.tokens_out,
        "earned_sats": totals.provider_msat // 1000,
        "held_sats": held // 1000,
        "payable_sats": max(0, balance - held) // 1000,
        "paid_sats": paid // 1000,
        "pending_sats": pending // 1000,
        "payouts": [
            {
                "id": p.id,
                "sats": p.amount_msat // 1000,
                "fee_msat": p.fee_msat,
                "state": p.state,
                "when": datetime.fromtimestamp(p.created_at, UTC).strftime("%Y-%m-%d %H:%M"),
            }
            for p in payouts
        ],
    }


def create_web(gw: Gateway) -> Blueprint:
    web = Blueprint("web", __name__, template_folder="templates", static_folder="static")

    def base_url() -> str:
        return (gw.config.public_url or request.host_url).rstrip("/")

    def limit() -> None:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))

    async def page(template: str, **context: Any) -> Response:
        html = await render_template(template, base_url=base_url(), active=template, **context)
        response = Response(html, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @web.get("/")
    async def account() -> Response:
        limit()
        return await page(
            "account.html",
            quota=gw.config.free_daily_requests,
            topup_min=gw.config.topup_min_sats,
            topup_max=gw.config.topup_max_sats,
            dev_wallet=gw.config.lightning == "dev",
        )

    @web.get("/pricing")
    async def pricing() -> Response:
        limit()
        return await page("pricing.html", models=model_list(gw), rates=gw.rates.describe())

    @web.get("/network")
    async def network() -> Response:
        limit()
        stats = await gw_stats(gw)
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

        def read(db: Any) -> dict[str, Any]:
            day_jobs, day_tokens, day_labels = series(db, now - timedelta(hours=24), 24, 1)
            start = now.replace(hour=0) - timedelta(days=7)
            week_jobs, week_tokens, week_labels = series(db, start, 7, 24)
            return {
                "day_jobs": bar_chart(day_jobs, day_labels, "Jobs per hour, last 24 hours"),
                "day_tokens": bar_chart(day_tokens, day_labels, "Tokens per hour, last 24 hours"),
                "week_jobs": bar_chart(week_jobs, week_labels, "Jobs per day, last 7 days"),
                "week_tokens": bar_chart(week_tokens, week_labels, "Tokens per day, last 7 days"),
            }

        charts = await gw.store.read(read)
        return await page("network.html", stats=stats, **charts)

    @web.get("/audit")
    async def audit() -> Response:
        limit()
        raw = request.args.get("page", "1")
        current = int(raw) if raw.isdigit() and int(raw) >= 1 else 1
        per_page = 25
        jobs, total = await audit_page(gw, current, per_page)
        pages = max(1, -(-total // per_page))
        return await page("audit.html", jobs=jobs, total=total, page=current, pages=pages)

    @web.route("/providers", methods=["GET", "POST"])
    async def providers() -> Response:
        limit()
        node_id = request.args.get("node", "").strip()
        history: list[dict[str, Any]] | None = None
        denied = False
        if request.method == "POST":
            form = await request.form
            node_id = str(form.get("node", "")).strip()
            secret = str(form.get("secret", ""))
            known = await gw.store.read(lambda db: nodes_db.node(db, node_id))
            if known is not None and hmac.compare_digest(known.secret_hash, hash_secret(secret)):
                history = [
                    attrs.asdict(job)
                    for job in await gw.store.read(lambda db: jobs_db.node_jobs(db, node_id, 200))
                ]
            else:
                denied = True
        summary = None
        if node_id:
            now = gw.billing.wall()
            summary = await gw.store.read(lambda db: node_summary(db, node_id, now))
        return await page(
            "providers.html",
            node_id=node_id,
            summary=summary,
            history=history,
            denied=denied,
            online=node_id in gw.registry.nodes,
            threshold=gw.config.payout_threshold_sats,
        )

    @web.get("/docs")
    async def docs() -> Response:
        limit()
        return await page("docs.html", models=model_list(gw))

    @web.get("/qr.svg")
    async def qr() -> Response:
        limit()
        data = request.args.get("data", "")
        if not data or len(data) > 2000:
            raise errors.InvalidRequest("data: 1 to 2000 characters", param="data")
        buffer = io.BytesIO()
        segno.make(data.upper() if data.lower().startswith("ln") else data, error="m").save(
            buffer, kind="svg", scale=5, border=2
        )
        response = Response(buffer.getvalue(), content_type="image/svg+xml")
        response.headers["Cache-Control"] = "public, max-age=3600"
        response.headers["ETag"] = hashlib.sha256(data.encode()).hexdigest()[:16]
        return response

    return web
