"""The admin endpoint: operator commands that need the running process.

Invariant: it listens only on a Unix socket next to the database, mode 0600, so only
the operator's user can reach it, never the network. It is a separate app from the
public one, so no public route can ever lead to it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import httpx
import trio
from quart import Response, request
from quart_trio import QuartTrio

from routecat.api.http import error_response, json_response
from routecat.config import Config
from routecat.db.schema import is_postgres, redact, sqlite_path
from routecat.errors import InvalidRequest, NotFound, RequestError
from routecat.gateway import Gateway


def socket_path(config: Config) -> str:
    """The admin socket of the gateway that ``config`` describes."""
    if config.admin_socket:
        return os.path.abspath(config.admin_socket)
    if is_postgres(config.database):
        # One per database URL, in the temporary directory (a second replica on the same
        # host needs its own ``admin_socket``, or ``admin = false``).
        digest = hashlib.sha256(config.database.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"routecat-{digest}.admin.sock")
    return os.path.abspath(sqlite_path(config.database)) + ".admin.sock"


def create_admin_app(gw: Gateway) -> QuartTrio:
    app = QuartTrio("routecat-admin")

    @app.errorhandler(RequestError)
    async def api_error(exc: RequestError) -> Response:
        return error_response(exc)

    @app.get("/nodes")
    async def nodes() -> Response:
        now = gw.clock.monotonic()
        return json_response(
            {
                "nodes": [n.describe(now) for n in gw.registry.nodes.values()],
                **gw.registry.statistics(),
            }
        )

    @app.post("/nodes/<node_id>/disconnect")
    async def disconnect(node_id: str) -> Response:
        node = gw.registry.nodes.get(node_id)
        if node is None:
            raise NotFound(f"node {node_id} is not connected")
        data = await request.get_json(silent=True) or {}
        node.close(str(data.get("reason") or "disconnected by the operator"))
        return json_response({"disconnected": node_id})

    @app.post("/wallet/pay")
    async def wallet_pay() -> Response:
        from routecat.money.lightning.devwallet import DevWallet
        from routecat.money.lightning.errors import InvoiceRejected

        if not isinstance(gw.lightning, DevWallet):
            raise InvalidRequest("only the dev wallet can pay invoices from the command line")
        data = await request.get_json(silent=True) or {}
        try:
            payment_hash = await gw.lightning.settle_own(str(data.get("invoice", "")))
        except InvoiceRejected as exc:
            raise InvalidRequest(str(exc)) from None
        gw.topups.wake()
        state = await gw.topups.check(payment_hash)
        return json_response({"payment_hash": payment_hash, "topup": state})

    @app.post("/lightning/reconcile")
    async def reconcile() -> Response:
        credited = await gw.topups.reconcile()
        await gw.payouts.reconcile()
        return json_response({"topups_credited": credited})

    @app.post("/keys/invalidate")
    async def invalidate_keys() -> Response:
        gw.keys.invalidate()
        return json_response({"invalidated": True})

    @app.get("/status")
    async def status() -> Response:
        return json_response(
            {
                "version": gw.version,
                "commit": gw.commit,
                "url": gw.url,
                "scheduler": gw.scheduler.statistics(),
                "registry": gw.registry.statistics(),
            }
        )

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        if isinstance(exc, ValueError):
            return error_response(InvalidRequest(str(exc)))
        return error_response(RequestError(f"admin command failed: {type(exc).__name__}"))

    return app


def prepare_socket(path: str) -> None:
    """Remove a stale socket left by a crash (a live gateway still answers on it)."""
    if os.path.exists(path):
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=1) as client:
                client.get("http://admin/status")
        except httpx.HTTPError:
            os.unlink(path)
        else:
            raise RuntimeError(f"another gateway is running on this database ({path})")


async def secure_socket(path: str) -> None:
    sock = trio.Path(path)
    for _ in range(100):
        if await sock.exists():
            await sock.chmod(0o600)
            return
        await trio.sleep(0.01)


def admin_call(config: Config, method: str, path: str, body: Any = None) -> Any:
    """Call the running gateway's admin endpoint (used by the CLI)."""
    sock = socket_path(config)
    database = redact(config.database)
    if not os.path.exists(sock):
        raise LookupError(f"no gateway is running on {database} (no {sock})")
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=60) as client:
            response = client.request(method, f"http://admin{path}", json=body)
    except httpx.HTTPError as exc:
        raise LookupError(f"the gateway on {database} does not answer: {exc}") from None
    data = response.json()
    if response.status_code >= 400:
        raise LookupError(data.get("error", {}).get("message", response.text))
    return data
