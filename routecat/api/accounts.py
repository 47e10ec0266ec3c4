"""Accounts: key registration, balance, Lightning top-ups and the backend's webhook.

Invariant: a key is shown once, at registration; every other route here authenticates
it from the ``Authorization`` header and is rate-limited per key (or per IP before a
key exists)."""

from __future__ import annotations

import logging
import re

from quart import Response, request

from routecat import errors
from routecat.api.http import App, json_response, read_json, remote_ip
from routecat.api.public import int_arg
from routecat.api.schema import RegisterRequest, TopupRequest, decode_json, parse_request
from routecat.db import jobs as jobs_db
from routecat.gateway import Gateway

log = logging.getLogger("routecat.http")


def register_accounts(app: App, gw: Gateway) -> None:
    @app.post("/v1/auth/register")
    async def register() -> Response:
        await gw.register_limit.acquire(remote_ip(gw))
        body = parse_request(RegisterRequest, await read_json())
        record, key = await gw.keys.register(body.name)
        log.info("registered key %s", record.prefix)
        return json_response({"api_key": key, "quota_daily": gw.config.free_daily_requests}, 200)

    @app.get("/v1/auth/balance")
    async def balance() -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        gw.read_limit.acquire_nowait(f"key:{key.id}")
        return json_response(await gw.admissions.balance(key.id))

    @app.get("/v1/auth/usage")
    async def usage() -> Response:
        """The key's own billed jobs, newest first: only its owner sees them."""
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        gw.read_limit.acquire_nowait(f"key:{key.id}")
        page = int_arg("page", 1, 1, 1_000_000)
        per_page = int_arg("per_page", 50, 1, 100)
        found, total = await gw.store.read(lambda db: jobs_db.key_jobs(db, key.id, page, per_page))
        data = [
            {
                "id": j.id,
                "model": j.model,
                "kind": j.kind,
                "free": j.free,
                "tokens_in": j.tokens_in,
                "tokens_out": j.tokens_out,
                "cost_msat": j.cost_msat,
                "cost_sats": j.cost_msat // 1000,
                "timestamp": j.finished_at[:19] + "Z",
            }
            for j in found
        ]
        return json_response({"data": data, "total": total, "page": page, "per_page": per_page})

    @app.post("/v1/auth/topup")
    async def topup() -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        gw.read_limit.acquire_nowait(f"key:{key.id}")
        body = parse_request(TopupRequest, await read_json())
        return json_response(await gw.topups.create(key.id, body.amount_sats))

    @app.get("/v1/auth/topup/<payment_hash>")
    async def topup_status(payment_hash: str) -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        gw.read_limit.acquire_nowait(f"key:{key.id}")
        if not re.fullmatch(r"[0-9a-f]{64}", payment_hash):
            raise errors.InvalidRequest("a payment hash is 64 hex characters", param="payment_hash")
        return json_response(await gw.topups.status(key.id, payment_hash))

    @app.post("/v1/lightning/webhook")
    async def lightning_webhook() -> Response:
        """A backend's payment notification: only a hint, checked with the backend."""
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        data = await read_json()
        if isinstance(data, str):  # LNbits sends its JSON encoded twice
            try:
                data = decode_json(data.encode())
            except errors.InvalidRequest:
                data = None  # a hint without a payment hash: nothing to check
        payment_hash = data.get("payment_hash") if isinstance(data, dict) else None
        if (
            isinstance(payment_hash, str)
            and re.fullmatch(r"[0-9a-f]{64}", payment_hash)
            and await gw.topups.exists(payment_hash)
        ):
            await gw.topups.check(payment_hash)
        return json_response({"ok": True})
