"""The stock Go Owlrun agent's routes (``owlrun_compat``; off by default): registration,
the websocket, and the one-time job fetch. ``routecat.network.stock`` is the logic.

Invariants: a node id is bound to the hash of its provider key at first registration
(the registry's rule for every node: a known id with another key is refused, and so is
an address change, which needs that key); the key travels in the websocket URL's
query, and is never logged (Hypercorn's access log is off; messages name the node id);
a registration body (it holds the key) is never logged either.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from quart import Response, request, websocket

from owlrun.protocol import Hello, ModelInfo
from routecat import errors
from routecat.api.http import App, json_response, read_json
from routecat.db import nodes as nodes_db
from routecat.db.nodes import StockRegistration
from routecat.gateway import Gateway
from routecat.network.registry import NODE_ID, models_ok
from routecat.network.remote import RemoteLink
from routecat.network.session import Transport
from routecat.network.stock import Registration, fetch_request, serve_stock_session

PROVIDER_KEY = re.compile(r"owlr_prov_[0-9a-f]{48}")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _provider_key(header: str | None) -> str:
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not PROVIDER_KEY.fullmatch(token.strip()):
        raise errors.InvalidApiKey("a provider key is 'Bearer owlr_prov_' + 48 hex characters")
    return token.strip()


def _registration(data: Any) -> tuple[str, list[str], str, str, int | None]:
    if not isinstance(data, dict):
        raise errors.InvalidRequest("the body is a JSON object")
    node_id = data.get("node_id")
    if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
        raise errors.InvalidRequest("node_id: 4 to 64 letters, digits, '-' or '_'", param="node_id")
    models = data.get("models")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise errors.InvalidRequest("models: a list of model names", param="models")
    if not models_ok([ModelInfo(name=m) for m in models]):
        raise errors.InvalidRequest("too many models or a malformed model name", param="models")
    address = data.get("lightning_address") or ""
    if not isinstance(address, str):
        raise errors.InvalidRequest("lightning_address: a string", param="lightning_address")
    version = data.get("version") or ""
    if not isinstance(version, str) or len(version) > 64 or not version.isprintable():
        raise errors.InvalidRequest(
            "version: printable text, at most 64 characters", param="version"
        )
    threshold = data.get("redeem_threshold_sats")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int)):
        threshold = None
    return node_id, models, address, version, threshold


def register_stock(app: App, gw: Gateway) -> None:

    def enabled() -> None:
        if not gw.config.owlrun_compat:
            raise errors.NotFound(f"no route for {request.method} {request.path}")

    @app.post("/v1/gateway/register")
    async def stock_register() -> Response:
        enabled()
        await gw.register_limit.acquire(
            "stock:" + request.remote_addr if request.remote_addr else "stock"
        )
        key = _provider_key(request.headers.get("Authorization"))
        node_id, models, address, version, threshold = _registration(await read_json())
        if address:
            why = gw.registry.address_problem(address)
            if why is not None:
                raise errors.InvalidRequest(
                    f"lightning_address is not a Lightning Address: {why}",
                    param="lightning_address",
                )
        hello = Hello(
            node_id=node_id,
            agent_version=version,
            protocol_version=1,
            models=[ModelInfo(name=m) for m in models],
            max_concurrency=gw.config.compat_concurrency,
            payout_address=address,
            payout_threshold_sats=threshold,
        )
        problem = await gw.registry.authenticate(hello, key)
        if problem is not None:
            raise errors.InvalidApiKey(f"registration refused: {problem}")
        # In the database: the agent may dial another replica than the one it registered at.
        record = StockRegistration(
            node_id, tuple(models), version, gw.config.payout_threshold(threshold)
        )
        now, digest = gw.clock.wall(), key_hash(key)
        await gw.store.write(lambda db: nodes_db.put_stock_registration(db, digest, record, now))
        return json_response({"status": "registered", "node_id": node_id})

    @app.get("/v1/gateway/jobs/<job_id>/proxy/request")
    async def stock_fetch(job_id: str) -> Response:
        enabled()
        digest = key_hash(_provider_key(request.headers.get("Authorization")))
        body = fetch_request(list(gw.registry.nodes.values()), job_id, digest)
        if body is None and gw.config.cluster_secret:
            # Behind a load balancer: the socket, and so the request, may be on another
            # replica (the directory says which one holds this key's node).
            found = await gw.store.read(lambda db: nodes_db.stock_registration(db, digest))
            remote = gw.registry.remote.get(found.node_id) if found is not None else None
            if isinstance(remote, RemoteLink):
                body = await gw.forwarder.fetch_stock_request(remote, job_id, digest)
        if body is None:
            raise errors.NotFound("no such job for this key (or already fetched, or expired)")
        return json_response(body)

    @app.websocket("/v1/gateway/ws")
    async def stock_socket() -> None:
        if not gw.config.owlrun_compat:
            await websocket.close(1008, "not found")
            return
        key = websocket.args.get("api_key", "")
        registration = None
        if PROVIDER_KEY.fullmatch(key):
            digest = key_hash(key)
            found = await gw.store.read(lambda db: nodes_db.stock_registration(db, digest))
            if found is not None:
                registration = Registration(
                    found.node_id, list(found.models), found.version, found.threshold_sats
                )
        await websocket.accept()
        if registration is None:
            await websocket.close(1008, "register first (POST /v1/gateway/register)")
            return

        async def close(code: int, reason: str) -> None:
            await websocket.close(code, reason)

        await serve_stock_session(
            gw.registry,
            Transport(send=websocket.send, receive=websocket.receive, close=close),
            registration,
            key_hash(key),
            capacity=gw.config.compat_concurrency,
            threshold_sats=registration.threshold_sats,
            fetch_timeout=gw.config.compat_fetch_timeout,
            earnings=gw.earnings.stock_ack,
        )
