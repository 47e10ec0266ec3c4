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
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import segno
from quart import Blueprint, Response, render_template, request

from ledger import book
from routecat import errors
from routecat.api.http import remote_ip
from routecat.api.public import audit_page, gw_stats, model_list
from routecat.db import jobs as jobs_db
from routecat.db import nodes as nodes_db
from routecat.db import payouts as payouts_db
from routecat.gateway import Gateway
from routecat.network.registry import hash_secret
from routecat.web.charts import bar_chart, series

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none';"
    " form-action 'self'; frame-ancestors 'none'"
)


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
    stock = nodes_db.stock_version(db, node_id)
    return {
        "id": node.id,
        "name": node.name,
        "kind": "native" if stock is None else "stock",
        "agent_version": stock or "",
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
        now = datetime.fromtimestamp(gw.clock.wall(), UTC).replace(
            minute=0, second=0, microsecond=0
        )

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
            now = gw.clock.wall()
            summary = await gw.store.read(lambda db: node_summary(db, node_id, now))
            live = gw.registry.nodes.get(node_id)
            if summary is not None and live is not None:  # what it runs now
                described = live.describe(gw.clock.monotonic())
                summary.update(kind=described["kind"], agent_version=described["agent_version"])
        return await page(
            "providers.html",
            node_id=node_id,
            summary=summary,
            history=history,
            denied=denied,
            online=node_id in gw.registry.nodes or node_id in gw.registry.remote,
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
