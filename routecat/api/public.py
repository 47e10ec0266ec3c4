"""Public read endpoints: health, readiness, metrics, models, the audit log, stats.

Invariant: everything here is read-only and rate-limited per client IP (except the
operational probes, which a load balancer calls often)."""

from __future__ import annotations

from typing import Any

from quart import Response, request

from ledger.money import cost_msat
from routecat import errors
from routecat.api.http import App, json_response, remote_ip
from routecat.clock import iso
from routecat.db import jobs as jobs_db
from routecat.gateway import Gateway


def register_public(app: App, gw: Gateway) -> None:
    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if not gw.ready:
            return json_response({"status": "starting or stopping"}, 503)
        return json_response({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        return json_response({"object": "list", "data": model_list(gw)})

    @app.get("/v1/models/<path:model>")
    async def model(model: str) -> Response:
        found = [m for m in model_list(gw) if m["id"] == model]
        if not found:
            raise errors.NotFound(
                f"model '{model}' is not served right now", code="model_not_found", param="model"
            )
        return json_response(found[0])

    @app.get("/v1/audit")
    async def audit() -> Response:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        page = int_arg("page", 1, 1, 1_000_000)
        per_page = int_arg("per_page", 50, 1, 100)
        jobs, total = await audit_page(gw, page, per_page)
        return json_response({"jobs": jobs, "total": total, "page": page, "per_page": per_page})

    @app.get("/v1/stats")
    async def stats() -> Response:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        return json_response(await gw_stats(gw))


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise errors.InvalidRequest(
            f"invalid value for '{name}': an integer from {low} to {high}", param=name
        )
    return int(raw)


def pricing(gw: Gateway, model: str) -> dict[str, Any]:
    """USD per 1M tokens as the catalog says, and at the current rate the same in msat
    (exact, rounded up once) and in sats as integers (rounded up: a client decoding
    into an integer type gets one)."""
    price = gw.catalog.price(model)
    rate = gw.rates.last_rate()
    body: dict[str, Any] = {
        "input_per_1m_tokens_usd": float(price.input_usd_per_1m),
        "output_per_1m_tokens_usd": float(price.output_usd_per_1m),
    }
    for side, usd in (("input", price.input_usd_per_1m), ("output", price.output_usd_per_1m)):
        msat = None if rate is None else cost_msat(1_000_000, 0, usd, usd, rate)
        body[f"{side}_per_1m_tokens_sats"] = None if msat is None else -(-msat // 1000)
        body[f"{side}_per_1m_tokens_msat"] = msat
    return body


def model_list(gw: Gateway) -> list[dict[str, Any]]:
    online = gw.registry.online_models()
    out = []
    for name in sorted(online):
        out.append(
            {
                "id": name,
                "object": "model",
                "created": int(gw.registry.model_seen.get(name, gw.started_at)),
                "owned_by": "community",
                "routecat_pricing": pricing(gw, name),
                "routecat_nodes": len(online[name]),
                "routecat_kind": "embedding" if gw.registry.is_embedding(name) else "chat",
                "context_length": gw.registry.context_length(name),
                "max_output_tokens": gw.admissions.ceiling(name, gw.registry.context_length(name)),
            }
        )
    return out


async def audit_page(gw: Gateway, page: int, per_page: int) -> tuple[list[dict[str, Any]], int]:
    found, total = await gw.store.read(lambda db: jobs_db.audit_page(db, page, per_page))
    jobs = [
        {
            "id": r.id,
            "model": r.model,
            "tokens_in": r.tokens_in,
            "tokens_out": r.tokens_out,
            "duration_ms": r.duration_ms,
            "cost_sats": r.cost_msat // 1000,
            "cost_msat": r.cost_msat,
            "timestamp": r.finished_at[:19] + "Z",
        }
        for r in found
    ]
    return jobs, total


async def gw_stats(gw: Gateway) -> dict[str, Any]:
    since = iso(gw.clock.wall() - 24 * 3600)

    day = await gw.store.read(lambda db: jobs_db.activity_since(db, since))
    return {
        "nodes_online": len(gw.registry.everywhere()),  # every replica's
        "jobs_24h": day.jobs,
        "tokens_24h": day.tokens,
        **gw.rates.describe(),
        "version": gw.version,
        "commit": gw.commit,
    }
