"""The node websocket (``owlrun.protocol.WS_PATH``) as a session ``Transport``, served
two ways.

On its own connection (``claim_node_connection``): a connection whose first request is
the upgrade, as every agent opens it, is served here on the socket with wsproto, in
the session's task. Otherwise as plain ASGI (``serve_node_websocket``), in front of
Quart (``routecat.api.asgi``): hypercorn's events as the transport. With 10,000 idle
nodes a heartbeat is most of what a gateway does, and hypercorn's path for one frame
(its HTTP/1.1 protocol, its websocket stream, a queue to the application's task, a
timeout scope on every read) cost about twice the first way's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from owlrun.protocol import NODE_HEADER, SECRET_HEADER, WS_PATH
from routecat.api.http import Receive, Send
from routecat.config import Config
from routecat.network.link import NativeLink
from routecat.network.registry import Registry
from routecat.network.session import Transport, serve_node_session

log = logging.getLogger("routecat.http")

_NODE = NODE_HEADER.lower().encode()
_SECRET = SECRET_HEADER.lower().encode()


async def _end_session(scope: trio.CancelScope) -> NoReturn:
    """The peer is gone: end its session wherever it waits, as a cancellation of the
    session's scope (from within it)."""
    scope.cancel()
    await trio.lowlevel.checkpoint()  # raises Cancelled: the scope was cancelled
    raise AssertionError("unreachable: the session's scope is cancelled")


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
        await _end_session(self.scope)

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
    """Accept the node's websocket from hypercorn and run its session until it ends."""
    if (await receive())["type"] != "websocket.connect":
        return  # gone before the handshake ended
    await send({"type": "websocket.accept"})
    await _run(registry, config, on_online, _Socket(receive, send), scope["headers"])


async def _run(
    registry: Registry,
    config: Config,
    on_online: Callable[[NativeLink], None],
    socket: _Socket | _RawSocket,
    header_list: Iterable[tuple[bytes, bytes]],
) -> None:
    """Run a node's session on an accepted socket until it ends; then close the socket
    (1000) if neither end has, or with 1011 if the session failed."""
    headers: dict[bytes, bytes] = {}
    for name, value in header_list:  # the first of each, as Quart's
        headers.setdefault(name, value)
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


# The node websocket on a connection's first request, as every agent opens it.
_CLAIMED = b"GET " + WS_PATH.encode() + b" "
_READ = 65536


async def claim_node_connection(
    registry: Registry,
    config: Config,
    on_online: Callable[[NativeLink], None],
    stream: trio.SocketStream,
    *,
    wait: float,
    max_head: int,
) -> trio.abc.HalfCloseableStream | None:
    """Serve a new connection whose first request opens the node websocket here, on
    the socket itself; give any other back, as a stream that first replays what was
    read of it (None once served or gone).

    Here a frame is one read, wsproto's parse and the session's loop, in one task.
    Whatever this does not recognise (a query string, a head it cannot parse, an
    upgrade later on a keep-alive connection) goes to hypercorn, which serves the same
    session through ``serve_node_websocket``. ``wait`` bounds the wait for the head
    (hypercorn's keep-alive timeout: what it would give an idle connection),
    ``max_head`` its size (hypercorn's bound on an incomplete head).
    """
    data = bytearray()
    end = -1
    try:
        with trio.move_on_after(wait):
            while end < 0 and len(data) <= max_head and _CLAIMED.startswith(data[: len(_CLAIMED)]):
                more = await stream.receive_some(_READ)
                if not more:
                    break
                data += more
                end = data.find(b"\r\n\r\n", max(0, len(data) - len(more) - 3))
        if data.startswith(_CLAIMED) and end >= 0:
            ws = WSConnection(ConnectionType.SERVER)
            try:
                ws.receive_data(bytes(data[: end + 4]))
                request = next(iter(ws.events()), None)
            except RemoteProtocolError:
                request = None  # hypercorn answers it as it would any bad request
            if isinstance(request, Request):
                await stream.send_all(ws.send(AcceptConnection()))
                socket = _RawSocket(stream, ws, config.max_frame_bytes)
                if end + 4 < len(data):
                    await socket.feed(bytes(data[end + 4 :]))
                await _run(registry, config, on_online, socket, request.extra_headers)
                await stream.aclose()
                return None
        if not data:
            await stream.aclose()
            return None
        return _Replay(stream, bytes(data))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.aclose()  # gone (reset) before the session: nothing failed
        return None
    except BaseException:
        await stream.aclose()
        raise


class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return what was already read from it."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self._stream = stream
        self._data = data
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._data:
            return await self._stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._data) if max_bytes is None else max_bytes
        data, self._data = self._data[:size], self._data[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class _RawSocket:
    """A node websocket on its own connection: wsproto over the socket stream. A read
    that returns several frames queues them; a ping is answered as it is read; the
    peer's close, its leaving or a broken frame ends the session as the ASGI socket's
    disconnect does."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, max_message: int) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message
        self._lock = trio.Lock()
        self._messages: deque[str | bytes] = deque()
        self._parts: list[Any] = []  # str or bytes: the pieces of one message
        self._size = 0
        self._ended = False
        self.scope = trio.CancelScope()
        self.closed = False

    async def receive(self) -> str | bytes:
        while not self._messages:
            if self._ended:
                await self._gone()
            try:
                data = await self._stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            await self.feed(data)
        return self._messages.popleft()

    async def feed(self, data: bytes) -> None:
        """Parse what was read (b"" at the end of the stream) and act on its events."""
        if not data:
            self._ended = True
            return
        self._ws.receive_data(data)
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max:
                    await self.close(1009, "message over the size limit")
                    self._ended = True
                    return
                self._parts.append(event.data)
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    empty: str | bytes = "" if isinstance(event, TextMessage) else b""
                    self._messages.append(parts[0] if len(parts) == 1 else empty.join(parts))
            elif isinstance(event, Ping) and self._ws.state is ConnectionState.OPEN:
                await self._write(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The peer's close, or wsproto's for a frame that breaks the protocol.
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    self.closed = True
                    await self._last_write(self._ws.send(event.response()))
                else:
                    await self.close(event.code, event.reason or "")
                self._ended = True
                return

    async def send(self, text: str) -> None:
        if self._ws.state is not ConnectionState.OPEN:
            await self._gone()  # a frame queued before the close was read
        await self._write(self._ws.send(TextMessage(data=text)))

    async def _gone(self) -> NoReturn:
        self.closed = self._ended = True
        await _end_session(self.scope)

    async def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.closed = True
            if self._ws.state is ConnectionState.OPEN:
                await self._last_write(self._ws.send(CloseConnection(code=code, reason=reason)))

    async def _last_write(self, data: bytes) -> None:
        """A close frame: written even if the session is ending (a frame queued before
        the peer's close cancels it), within a second."""
        with trio.move_on_after(1) as timeout:
            timeout.shield = True
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        async with self._lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The node is gone: its session ends as when it leaves.
                self.closed = self._ended = True
                self.scope.cancel()
                await trio.lowlevel.checkpoint()
            except BaseException:
                # A write cut short leaves half a frame: nothing may follow it.
                self.closed = self._ended = True
                raise
