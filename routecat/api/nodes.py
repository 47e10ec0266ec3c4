"""The node websocket route's adapter: Quart's websocket as a session ``Transport``."""

from __future__ import annotations

from collections.abc import Callable

from quart import websocket

from owlrun.protocol import NODE_HEADER, SECRET_HEADER
from routecat.config import Config
from routecat.network.link import NativeLink
from routecat.network.registry import Registry
from routecat.network.session import Transport, serve_node_session


async def _close(code: int, reason: str) -> None:
    await websocket.close(code, reason)


async def serve_node_websocket(
    registry: Registry, config: Config, on_online: Callable[[NativeLink], None]
) -> None:
    """Accept the node's websocket and run its session until it ends."""
    await websocket.accept()
    await serve_node_session(
        registry,
        config,
        Transport(send=websocket.send, receive=websocket.receive, close=_close),
        node_header=websocket.headers.get(NODE_HEADER, ""),
        secret=websocket.headers.get(SECRET_HEADER, ""),
        on_online=on_online,
    )
