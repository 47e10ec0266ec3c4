"""``POST /v1/chat/completions``, ``POST /v1/completions`` and the node websocket
(``routecat.api.nodes``) as plain ASGI, in front of the Quart-Trio app, which serves
every other route.

These two routes carry nearly all of the traffic, and Quart's request and response
objects, hooks, router and second task cost about as much as the rest of a request.
The handler here keeps every rule the app's hooks keep for the other routes:
``X-Request-Id`` on every response, the CORS headers of ``/v1/*``, the request metrics
and the access log line, every error in the OpenAI shape (never a traceback), 413 past
the body limit, 408 when the body does not arrive, ``Connection: close`` on an error
for a request that carried a body, 405 (with ``Allow``) for another method; a
preflight (``OPTIONS``) goes to the app. The exchange is counted like the app's
(``App.exchange``). One task reads the request from its first byte to the end (the
body, then the client's leaving): a client that leaves at any moment cancels the
exchange, and with it the job (``completions.start_job``), and an answer given before
the body was read never waits on hypercorn's full queue to the app.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from typing import Any

import attrs
import trio

from owlrun.protocol import WS_PATH
from routecat import errors
from routecat.api.completions import (
    SSE_HEADERS,
    Collector,
    free_header,
    prepare_job,
    start_job,
    stream_body,
)
from routecat.api.errors import (
    MethodNotAllowed,
    RequestTimeout,
    RequestTooLarge,
    error_body,
    error_headers,
    status_of,
)
from routecat.api.http import (
    CORS_HEADERS,
    REQUEST_ID,
    App,
    Receive,
    Send,
    end_exchange,
    method_label,
    send_shielding_the_end,
)
from routecat.api.nodes import claim_node_connection, serve_node_websocket
from routecat.gateway import Gateway
from routecat.network.jobs import JobKind

log = logging.getLogger("routecat.http")

ROUTES: dict[str, JobKind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
BODY_TIMEOUT = 60.0

Headers = list[tuple[bytes, bytes]]


def _encoded(headers: dict[str, str]) -> Headers:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


_CORS = _encoded(CORS_HEADERS)
_SSE = [(b"content-type", b"text/event-stream"), *_encoded(SSE_HEADERS)]


@attrs.define(eq=False)
class _Exchange:
    """One request on these routes: what its answer needs from the request's headers,
    and the response's start (which is when it is counted and logged)."""

    gw: Gateway
    scope: dict[str, Any]
    send: Send
    request_id: str
    authorization: str | None
    content_length: int | None
    has_body: bool
    started: float = attrs.Factory(time.perf_counter)
    status: int = 0

    @classmethod
    def of(cls, gw: Gateway, scope: dict[str, Any], send: Send) -> _Exchange:
        request_id = authorization = transfer = None
        length: int | None = None
        for name, value in scope["headers"]:  # the first of each, like the app's
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"x-request-id" and request_id is None:
                request_id = value.decode("latin-1")
            elif name == b"content-length" and length is None:
                # h11 allows digits only; past 18 of them, simply too large (413).
                length = int(value) if value.isdigit() and len(value) <= 18 else 10**18
            elif name == b"transfer-encoding" and transfer is None:
                transfer = value.decode("latin-1")
        if request_id is None or not REQUEST_ID.fullmatch(request_id):
            request_id = "req_" + secrets.token_hex(8)
        has_body = bool(length) or "chunked" in (transfer or "")
        return cls(gw, scope, send, request_id, authorization, length, has_body)

    async def start(self, status: int, headers: Headers) -> None:
        self.status = status
        elapsed = time.perf_counter() - self.started
        method, path = self.scope["method"], self.scope["path"]
        self.gw.metrics.requests.labels(path, method_label(method), str(status)).inc()
        self.gw.metrics.latency.labels(path).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d %.1fms",
                method,
                path,
                status,
                elapsed * 1000,
                extra={"request_id": self.request_id},
            )
        headers += [(b"x-request-id", self.request_id.encode()), *_CORS]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool) -> None:
        message = {"type": "http.response.body", "body": data, "more_body": more}
        await send_shielding_the_end(self.send, message)

    async def answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await self.start(status, head + _encoded(headers))
        await self.body(data, more=False)

    async def error(self, exc: errors.RequestError, headers: dict[str, str] | None = None) -> None:
        """The OpenAI error shape. A request that carried a body is answered with
        ``Connection: close``: the error may have come before the body was read whole,
        and an unread rest would make the connection unusable for the next request."""
        extra = {**error_headers(exc), **(headers or {})}
        if self.has_body:
            extra["Connection"] = "close"
        await self.answer(status_of(exc)[0], error_body(exc), extra)


@attrs.define(eq=False)
class CompletionRoutes:
    """The ASGI application hypercorn serves: the completions routes and the node
    websocket here; the rest (lifespan, the stock agents' websocket, preflights, every
    other path) in ``app``."""

    app: App
    gw: Gateway

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            gw = self.gw
            await serve_node_websocket(
                gw.registry, gw.config, gw.earnings.mark_dirty, scope, receive, send
            )
            return
        kind = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if kind is None or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        with self.app.exchange():
            exchange = _Exchange.of(self.gw, scope, send)
            body = _Body(exchange.content_length, self.gw.config.max_body_bytes)
            async with trio.open_nursery() as nursery:
                # One task reads the request from its first byte to the client's leaving,
                # which ends the exchange (and its job) whatever it is doing: admitted,
                # queued, running or streaming. Hypercorn's queue to the app is bounded
                # and the end of a response waits for room in it: an answer given without
                # reading the body (a bad key, 413, 405) must not leave it full.
                nursery.start_soon(body.read, receive, nursery.cancel_scope)
                try:
                    if scope["method"] == "POST":
                        await self._serve(kind, exchange, body)
                    else:
                        wrong = MethodNotAllowed(
                            f"method {scope['method']} is not allowed on {scope['path']}"
                        )
                        await exchange.error(wrong, {"Allow": "OPTIONS, POST"})
                finally:
                    nursery.cancel_scope.cancel()

    async def claim(
        self, stream: trio.SocketStream, wait: float, max_head: int
    ) -> trio.abc.HalfCloseableStream | None:
        """A new connection, before hypercorn reads it: the node websocket is served
        here on the socket itself (``claim_node_connection``); anything else is given
        back to hypercorn."""
        gw = self.gw
        return await claim_node_connection(
            gw.registry, gw.config, gw.earnings.mark_dirty, stream, wait=wait, max_head=max_head
        )

    async def _serve(self, kind: JobKind, exchange: _Exchange, body: _Body) -> None:
        gw = self.gw
        try:
            spec, request = await prepare_job(gw, kind, exchange.authorization, body.whole)
            if request.stream:
                handle = await start_job(gw, spec)
                await exchange.start(200, _SSE + _encoded(free_header(handle)))
                async with contextlib.aclosing(stream_body(gw, handle, request)) as events:
                    async for data in events:
                        await exchange.body(data, more=True)
                await exchange.body(b"", more=False)
            else:
                # The job runs in this task: one task and one channel fewer.
                collector = Collector()
                handle = await start_job(gw, spec, collector.add)
                answer, headers = collector.answer(handle)
                await exchange.answer(200, answer, headers)
        except errors.RequestError as exc:
            if exchange.status:
                raise  # cannot happen: a stream's errors are events
            await exchange.error(exc)
        except Exception as exc:
            if exchange.status:
                raise  # the response has started: hypercorn ends the connection
            log.error(
                "unhandled error in POST %s",
                exchange.scope["path"],
                exc_info=exc,
                extra={"request_id": exchange.request_id},
            )
            await exchange.error(errors.RequestError("internal error; the request id names it"))


@attrs.define(eq=False)
class _Body:
    """The request's body as its reader task gathers it (kept up to ``limit`` bytes,
    the rest read and dropped), for the view to wait on (``whole``)."""

    length: int | None  # Content-Length, when the client said it
    limit: int
    parts: list[bytes] = attrs.Factory(list)
    size: int = 0
    ready: trio.Event = attrs.Factory(trio.Event)  # whole, or past the limit

    async def read(self, receive: Receive, exchange: trio.CancelScope) -> None:
        while (message := await receive())["type"] == "http.request":
            part = message.get("body", b"")
            if self.size <= self.limit:
                self.size += len(part)
                if self.size <= self.limit:
                    self.parts.append(part)
                else:
                    self.parts.clear()
                    self.ready.set()
            if not message.get("more_body", False):
                self.ready.set()
        # The client has left, or the response is over: the exchange ends. Its end
        # callbacks first (a job learns that its client is gone, not that the gateway
        # is stopping), then whatever the exchange is doing stops.
        end_exchange()
        exchange.cancel()

    async def whole(self) -> bytes:
        """The whole body: 413 past the limit (at once when ``Content-Length`` says
        so), 408 when it has not arrived within ``BODY_TIMEOUT``."""
        if (self.length or 0) > self.limit:
            raise RequestTooLarge(f"request body larger than {self.limit} bytes")
        with trio.move_on_after(BODY_TIMEOUT):
            await self.ready.wait()
        if not self.ready.is_set():
            raise RequestTimeout(f"the request body did not arrive within {BODY_TIMEOUT:g}s")
        if self.size > self.limit:
            raise RequestTooLarge(f"request body larger than {self.limit} bytes")
        return b"".join(self.parts)
