"""HTTP plumbing shared by every route: the app class, JSON in and out, client IPs,
and the hook that ends a job with its exchange.

Invariant owned here: an HTTP exchange in progress is counted from its first byte to
its last callback, so a shutdown waits for real work and never for idle keep-alive
connections.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any

import trio
from quart import (
    Response,
    jsonify,
    request,
)
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection

from routecat import errors
from routecat.api.clientip import client_ip
from routecat.api.errors import error_body, error_headers, status_of
from routecat.api.schema import decode_json
from routecat.gateway import Gateway

log = logging.getLogger("routecat.http")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": (
        "X-Request-Id, X-RouteCat-Cost-Msat, X-RouteCat-Free, X-RouteCat-Max-Tokens, Retry-After"
    ),
}
PREFLIGHT_HEADERS = {
    **CORS_HEADERS,
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": (
        "Authorization, Content-Type, X-Request-Id, OpenAI-Organization, OpenAI-Project,"
        " HTTP-Referer, X-Title"
    ),
    "Access-Control-Max-Age": "86400",
    "Vary": "Access-Control-Request-Headers",
}
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def preflight_headers(request_headers: Any) -> dict[str, str]:
    """A ``/v1/*`` preflight's answer: the headers the browser asks for are echoed
    (SDKs send ``x-stainless-*``, OpenRouter-style clients ``HTTP-Referer`` and
    ``X-Title``), when they are a well-formed list; else the known list."""
    asked = str(request_headers.get("Access-Control-Request-Headers", "")).strip()
    if asked and len(asked) <= 2000 and HEADER_LIST.fullmatch(asked):
        return {**PREFLIGHT_HEADERS, "Access-Control-Allow-Headers": asked}
    return PREFLIGHT_HEADERS


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """A request's method as a metrics label: any token is a valid HTTP method, and a
    label per made-up method would grow the metrics without bound."""
    return method if method in _METHODS else "OTHER"


# The callbacks that run when the current HTTP exchange ends (see ``App.exchange``);
# the tasks an exchange starts inherit the list.
# ASGI's two callables, as the plain-ASGI routes (``asgi``, ``nodes``) use them.
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

_EXCHANGE_END: ContextVar[list[Callable[[], None]]] = ContextVar("routecat_exchange_end")


async def send_shielding_the_end(send: Any, message: dict[str, Any]) -> None:
    """Send an ASGI message; the response's last one shielded. Hypercorn ends the
    exchange inside that call, in the caller's task: it tells the app the exchange is
    over (``http.disconnect``), and, when either side asked for ``Connection: close``,
    closes the socket. The disconnect cancels the app's task (Quart-Trio's, or our
    watcher's) in the middle of that close, and the socket then stayed open until the
    client closed it: a client still sending a body nobody reads waited forever. Socket
    writes are shielded by hypercorn already, so this adds no wait of its own."""
    if message.get("type") == "http.response.body" and not message.get("more_body", False):
        with trio.CancelScope(shield=True):
            await send(message)
    else:
        await send(message)


class _HTTPConnection(TrioASGIHTTPConnection):
    """Quart-Trio's HTTP connection, counted as an exchange (``App.exchange``), its
    last message sent whole (``send_shielding_the_end``)."""

    app: App

    async def __call__(self, receive: Any, send: Any) -> None:
        with self.app.exchange():
            await super().__call__(receive, functools.partial(send_shielding_the_end, send))


class App(QuartTrio):
    """The gateway's Quart-Trio app; counts HTTP exchanges in progress, so that a
    shutdown waits for real work and never for idle keep-alive connections."""

    asgi_http_class = _HTTPConnection

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exchanges = 0
        self.quiet = trio.Event()

    @contextlib.contextmanager
    def exchange(self) -> Iterator[None]:
        """One HTTP exchange in progress; the callbacks given to ``on_exchange_end``
        inside it run whatever ends it: the response sent, the client gone while the
        view ran, or while the response was starting (where no body iterator ever runs
        its ``finally``)."""
        callbacks: list[Callable[[], None]] = []
        token = _EXCHANGE_END.set(callbacks)
        self.exchanges += 1
        try:
            yield
        finally:
            end_exchange()
            _EXCHANGE_END.reset(token)
            self.exchanges -= 1
            if not self.exchanges:
                self.quiet.set()
                self.quiet = trio.Event()

    async def wait_quiet(self) -> None:
        """Return once no HTTP exchange is in progress."""
        while self.exchanges:
            await self.quiet.wait()


def on_exchange_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` (synchronous, must not raise) when this HTTP exchange ends."""
    _EXCHANGE_END.get().append(callback)


def end_exchange() -> None:
    """Run this exchange's end callbacks now (each once: the client is gone)."""
    callbacks = _EXCHANGE_END.get()
    while callbacks:
        callbacks.pop(0)()


def error_response(exc: errors.RequestError) -> Response:
    """The one place a domain error becomes an HTTP response (see ``api.errors``)."""
    response = jsonify(error_body(exc))
    response.status_code = status_of(exc)[0]
    response.headers.update(error_headers(exc))
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
