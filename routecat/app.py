"""The Quart-Trio application: the HTTP surface and its cross-cutting rules.

Invariants owned here: every response carries ``X-Request-Id``; every error, from a
view, the router or an unexpected exception, leaves in the OpenAI error shape with
the right status and never with a traceback; ``/v1/*`` answers CORS preflights.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import trio
from quart import (
    Response,
    g,
    has_request_context,
    has_websocket_context,
    jsonify,
    request,
    websocket,
)
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from ledger.money import usd_to_sats
from owlrun.protocol import WS_PATH
from routecat import errors
from routecat.api.nodes import serve_node_websocket
from routecat.clientip import client_ip
from routecat.db import jobs as jobs_db
from routecat.gateway import Gateway
from routecat.schema import RegisterRequest, TopupRequest, decode_json, parse_request

log = logging.getLogger("routecat.http")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "X-Request-Id, X-RouteCat-Cost-Msat, Retry-After",
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project,"
        " X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version,"
        " X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Retry-Count,"
        " X-Stainless-Timeout"
    ),
    "Access-Control-Max-Age": "86400",
}

_HTTP_ERRORS: dict[int, type[errors.ApiError]] = {
    400: errors.InvalidRequest,
    404: errors.NotFound,
    405: errors.MethodNotAllowed,
    413: errors.RequestTooLarge,
}


EXCHANGE_END = "routecat.on_exchange_end"


class _HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, plus callbacks that run whatever ends the exchange:
    the response sent, the client gone while the view ran, or while the response was
    starting (where no body iterator ever runs its ``finally``)."""

    app: App

    async def __call__(self, receive: Any, send: Any) -> None:
        callbacks: list[Callable[[], None]] = []
        cast(dict[str, Any], self.scope)[EXCHANGE_END] = callbacks
        self.app.exchanges += 1
        try:
            await super().__call__(receive, send)
        finally:
            for callback in callbacks:
                callback()
            self.app.exchanges -= 1
            if not self.app.exchanges:
                self.app.quiet.set()
                self.app.quiet = trio.Event()


class App(QuartTrio):
    """The gateway's Quart-Trio app; counts HTTP exchanges in progress, so that a
    shutdown waits for real work and never for idle keep-alive connections."""

    asgi_http_class = _HTTPConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges = 0
        self.quiet = trio.Event()

    async def wait_quiet(self) -> None:
        """Return once no HTTP exchange is in progress."""
        while self.exchanges:
            await self.quiet.wait()


def on_exchange_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` (synchronous, must not raise) when this HTTP exchange ends."""
    cast(dict[str, Any], request.scope)[EXCHANGE_END].append(callback)


def error_response(exc: errors.ApiError) -> Response:
    response = jsonify(exc.body())
    response.status_code = exc.status
    response.headers.update(exc.headers())
    return response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def remote_ip(gw: Gateway) -> str:
    return client_ip(request.remote_addr, request.headers.get("X-Forwarded-For"), gw.proxies)


async def read_json() -> Any:
    """The request body as JSON; 413 past the limit, 400 when it is not JSON."""
    body = await request.get_data(cache=False)
    assert isinstance(body, bytes)
    return decode_json(body)


def create_app(gw: Gateway) -> App:
    app = App("routecat")
    app.config["MAX_CONTENT_LENGTH"] = gw.config.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.config["BODY_TIMEOUT"] = 60
    app.config["RESPONSE_TIMEOUT"] = None

    @app.before_request
    async def start_request() -> Response | None:
        g.started = time.perf_counter()
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if REQUEST_ID.fullmatch(incoming) else "req_" + secrets.token_hex(8)
        if request.method == "OPTIONS" and request.path.startswith("/v1/"):
            return Response("", status=204, headers=PREFLIGHT_HEADERS)
        return None

    @app.after_request
    async def finish_request(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        if request.path.startswith("/v1/"):
            response.headers.update(CORS_HEADERS)
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        gw.metrics.requests.labels(rule, request.method, str(response.status_code)).inc()
        gw.metrics.latency.labels(rule).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d %.1fms",
                request.method,
                request.path,
                response.status_code,
                elapsed * 1000,
                extra={"request_id": g.get("request_id", "")},
            )
        return response

    @app.errorhandler(errors.ApiError)
    async def api_error(exc: errors.ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = _HTTP_ERRORS.get(status, errors.ApiError)
        message = {
            404: f"no route for {_method()} {_path()}",
            405: f"method {_method()} is not allowed on {_path()}",
            413: f"request body larger than {gw.config.max_body_bytes} bytes",
        }.get(status, exc.description or exc.name)
        response = error_response(kind(message))
        response.status_code = status
        if status == 413:
            # The unread rest of the body makes the connection unusable: close it, so
            # that a client's connection pool does not send its next request into it.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error(
            "unhandled error in %s %s",
            _method(),
            _path(),
            exc_info=exc,
            extra={"request_id": g.get("request_id", "")},
        )
        return error_response(errors.ApiError("internal error; the request id names it"))

    from routecat.web import create_web

    app.register_blueprint(create_web(gw))

    # -- operational endpoints --

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

    # -- accounts --

    @app.post("/v1/auth/register")
    async def register() -> Response:
        gw.register_limit.acquire_nowait(remote_ip(gw))
        body = parse_request(RegisterRequest, await read_json())
        record, key = await gw.keys.register(body.name)
        log.info("registered key %s", record.prefix)
        return json_response({"api_key": key, "quota_daily": gw.config.free_daily_requests}, 200)

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        from routecat.completions import serve_completion

        return await serve_completion(gw, "chat")

    @app.post("/v1/completions")
    async def completions() -> Response:
        from routecat.completions import serve_completion

        return await serve_completion(gw, "completion")

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

    @app.websocket(WS_PATH)
    async def node_socket() -> None:
        await serve_node_websocket(gw.registry, gw.config, gw.billing.mark_dirty)

    @app.get("/v1/auth/balance")
    async def balance() -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        gw.read_limit.acquire_nowait(f"key:{key.id}")
        return json_response(await gw.billing.balance(key.id))

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
            data = decode_json(data.encode())
        payment_hash = data.get("payment_hash") if isinstance(data, dict) else None
        if (
            isinstance(payment_hash, str)
            and re.fullmatch(r"[0-9a-f]{64}", payment_hash)
            and await gw.topups.exists(payment_hash)
        ):
            await gw.topups.check(payment_hash)
        return json_response({"ok": True})

    @app.get("/v1/audit")
    async def audit() -> Response:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        page = _int_arg("page", 1, 1, 1_000_000)
        per_page = _int_arg("per_page", 50, 1, 100)
        jobs, total = await audit_page(gw, page, per_page)
        return json_response({"jobs": jobs, "total": total, "page": page, "per_page": per_page})

    @app.get("/v1/stats")
    async def stats() -> Response:
        gw.read_limit.acquire_nowait("ip:" + remote_ip(gw))
        return json_response(await gw_stats(gw))

    return app


def _method() -> str:
    """The request's method; a websocket upgrade (which has no request context) is GET."""
    return request.method if has_request_context() else "GET"


def _path() -> str:
    if has_request_context():
        return request.path
    return websocket.path if has_websocket_context() else "?"


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise errors.InvalidRequest(
            f"invalid value for '{name}': an integer from {low} to {high}", param=name
        )
    return int(raw)


def pricing(gw: Gateway, model: str) -> dict[str, Any]:
    price = gw.catalog.price(model)
    rate = gw.rates.last_rate()
    body: dict[str, Any] = {
        "input_per_1m_tokens_usd": float(price.input_usd_per_1m),
        "output_per_1m_tokens_usd": float(price.output_usd_per_1m),
        "input_per_1m_tokens_sats": None,
        "output_per_1m_tokens_sats": None,
    }
    if rate is not None:
        body["input_per_1m_tokens_sats"] = float(usd_to_sats(price.input_usd_per_1m, rate))
        body["output_per_1m_tokens_sats"] = float(usd_to_sats(price.output_usd_per_1m, rate))
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
    since = (datetime.now(UTC) - timedelta(hours=24)).strftime("%Y-%m-%dT%H:%M:%S")

    day = await gw.store.read(lambda db: jobs_db.activity_since(db, since))
    return {
        "nodes_online": len(gw.registry.nodes),
        "jobs_24h": day.jobs,
        "tokens_24h": day.tokens,
        **gw.rates.describe(),
        "version": gw.version,
        "commit": gw.commit,
    }
