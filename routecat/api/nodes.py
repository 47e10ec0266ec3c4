"""The node websocket (``owlrun.protocol.WS_PATH``) as plain ASGI: hypercorn's events
as a session ``Transport``.

Served in front of Quart (``routecat.api.asgi``), like the completions routes: each
frame goes from hypercorn's queue to the session's receive loop, where Quart's
websocket passed it through a task and a queue of its own (and a signal) first. With
10,000 idle nodes a heartbeat is most of what a gateway does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from owlrun.protocol import NODE_HEADER, SECRET_HEADER
from routecat.api.http import Receive, Send
from routecat.config import Config
from routecat.network.link import NativeLink
from routecat.network.registry import Registry
from routecat.network.session import Transport, serve_node_session

log = logging.getLogger("routecat.http")

_NODE = NODE_HEADER.lower().encode()
_SECRET = SECRET_HEADER.lower().encode()


class _Socket:
    """One accepted node websocket. The client's leaving (``websocket.disconnect``)
    ends the session as a cancellation of its scope, wherever it waits."""

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.scope = trio.CancelScope()
        self.closed = False

    async def receive(self) -> str | bytes:
        event = await self._receive()
        if event["type"] == "websocket.receive":
            text = event.get("text")
            return text if text is not None else (event.get("bytes") or b"")
        self.closed = True  # websocket.disconnect: nothing more will come
        self.scope.cancel()
        await trio.lowlevel.checkpoint()  # raises Cancelled: the scope was cancelled
        raise AssertionError("unreachable: the session's scope is cancelled")

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            await self._send({"type": "websocket.close", "code": code, "reason": reason})


async def serve_node_websocket(
    registry: Registry,
    config: Config,
    on_online: Callable[[NativeLink], None],
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
) -> None:
    """Accept the node's websocket and run its session until it ends; then close the
    socket (1000) if neither end has, or with 1011 if the session failed."""
    if (await receive())["type"] != "websocket.connect":
        return  # gone before the handshake ended
    await send({"type": "websocket.accept"})
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:  # the first of each, as Quart's
        headers.setdefault(name, value)
    socket = _Socket(receive, send)
    code = 1000
    with socket.scope:
        try:
            await serve_node_session(
                registry,
                config,
                Transport(send=socket.send, receive=socket.receive, close=socket.close),
                node_header=headers.get(_NODE, b"").decode("latin-1"),
                secret=headers.get(_SECRET, b"").decode("latin-1"),
                on_online=on_online,
            )
        except Exception as exc:
            log.error("unhandled error in a node websocket", exc_info=exc)
            code = 1011
    await socket.close(code, "")
