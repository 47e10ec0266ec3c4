"""The node websocket at the socket level, both ways a gateway serves it.

A connection whose first request opens the node websocket is served by the gateway
itself on the socket (``routecat.api.nodes.claim_node_connection``); any other
(an upgrade after a keep-alive request, a query string) by hypercorn through the same
session. A raw wsproto client drives both, with what agents and proxies really do:
a head cut into bytes, a hello in the head's own segment, fragmented messages, pings,
closes, and what hostile ones do: broken frames, invalid UTF-8, messages over the
limit. Each way, the node's session and the other nodes fare the same.
"""

from __future__ import annotations

import logging
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import FrameProtocol

from owlrun.identity import Identity
from owlrun.protocol import (
    NODE_HEADER,
    SECRET_HEADER,
    WS_PATH,
    Heartbeat,
    Hello,
    ModelInfo,
    decode,
    encode,
)
from routecat.network.link import NativeLink
from routecat.network.registry import Registry
from tests.clients import wait_for
from tests.servers import Running, network_config, start_gateway

# The ways a node's socket reaches the gateway: on a connection's first request
# (served on the socket) or after a keep-alive request and with a query string (both
# served by hypercorn).
WAYS = ["first", "after-keep-alive", "query"]


class Peer:
    """A node's websocket made by hand: a trio stream and wsproto, client side."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.events: list[Event] = []

    async def write(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event:
        while not self.events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def message(self) -> str:
        """The next text message, answering nothing (the gateway pings no one)."""
        event = await self.next_event()
        assert isinstance(event, TextMessage), event
        assert event.message_finished
        return event.data

    async def closed_with(self) -> int:
        """Read until the gateway's close frame or the end; its code (1006 if none)."""
        with trio.fail_after(10):
            while True:
                try:
                    event = await self.next_event()
                except trio.BrokenResourceError:
                    return 1006
                if isinstance(event, CloseConnection):
                    return int(event.code)


async def open_tcp(gateway: Running) -> trio.SocketStream:
    """A plain TCP connection to the gateway's HTTP port."""
    host, port = gateway.url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


def new_identity() -> Identity:
    return Identity("node_" + secrets.token_hex(6), secrets.token_urlsafe(24))


def hello(identity: Identity) -> str:
    return encode(Hello(identity.node_id, "test", 1, [ModelInfo("socket:1b")], 1))


@asynccontextmanager
async def open_peer(
    gateway: Running,
    identity: Identity,
    way: str,
    *,
    pieces: int = 1,
    with_head: bytes = b"",
) -> AsyncIterator[Peer]:
    """Open the node websocket ``way``; the head is written in ``pieces`` writes, and
    ``with_head`` (websocket bytes) in the same write as its end."""
    stream = await open_tcp(gateway)
    try:
        if way == "after-keep-alive":
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                answer += await stream.receive_some(65536)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        ws = WSConnection(ConnectionType.CLIENT)
        target = WS_PATH + ("?via=proxy" if way == "query" else "")
        headers = [
            (NODE_HEADER.encode(), identity.node_id.encode()),
            (SECRET_HEADER.encode(), identity.secret.encode()),
        ]
        head = ws.send(Request(host="gateway", target=target, extra_headers=headers))
        if with_head:
            # The head's own bytes, then websocket frames right after it: as a client
            # that writes its first message without waiting for the 101.
            head += with_head
        step = max(1, len(head) // pieces)
        for start in range(0, len(head), step):
            await stream.send_all(head[start : start + step])
            if pieces > 1:
                await trio.sleep(0.01)
        peer = Peer(stream, ws)
        with trio.fail_after(10):
            accepted = await peer.next_event()
        assert isinstance(accepted, AcceptConnection), accepted
        with trio.fail_after(30):
            yield peer
    finally:
        await stream.aclose()


async def welcomed(peer: Peer, identity: Identity, *, sent: bool = False) -> None:
    if not sent:
        await peer.write(TextMessage(data=hello(identity)))
    with trio.fail_after(10):
        welcome = decode(await peer.message())
    assert welcome.type == "welcome", welcome


def online(registry: Registry) -> set[str]:
    return set(registry.nodes)


@pytest.fixture
async def gateway(nursery: trio.Nursery, tmp_path: Path) -> Running:
    return await start_gateway(nursery, network_config(tmp_path, None))


@pytest.mark.parametrize("way", WAYS)
async def test_a_node_is_served_whichever_way_its_socket_comes(gateway: Running, way: str) -> None:
    identity = new_identity()
    registry = gateway.gw.registry
    async with open_peer(gateway, identity, way) as peer:
        await welcomed(peer, identity)
        assert online(registry) == {identity.node_id}
        # A ping is answered below the session; a heartbeat moves the node's last_seen.
        link = registry.nodes[identity.node_id]
        assert isinstance(link, NativeLink)
        before = link.last_seen
        await peer.write(Ping(payload=b"are you there"))
        with trio.fail_after(10):
            pong = await peer.next_event()
        assert isinstance(pong, Pong) and pong.payload == b"are you there"
        await trio.sleep(0.01)
        await peer.write(TextMessage(data=encode(Heartbeat(in_flight=0))))
        await wait_for(lambda: link.last_seen > before)
        # The node's close is answered with the same code, and it is offline at once.
        await peer.write(CloseConnection(code=1000, reason="bye"))
        assert await peer.closed_with() == 1000
    await wait_for(lambda: not online(registry))


@pytest.mark.parametrize("pieces", [2, 7, 40])
async def test_a_head_that_comes_in_pieces_is_served(gateway: Running, pieces: int) -> None:
    identity = new_identity()
    async with open_peer(gateway, identity, "first", pieces=pieces) as peer:
        await welcomed(peer, identity)
        assert online(gateway.gw.registry) == {identity.node_id}


async def test_a_hello_in_the_heads_own_write_is_read(gateway: Running) -> None:
    # Only on a first request: hypercorn answers an upgrade with bytes after its head
    # with a 400 (its issue 225), where the socket's own server reads them as frames.
    identity = new_identity()
    first = bytes(FrameProtocol(client=True, extensions=[]).send_data(hello(identity)))
    async with open_peer(gateway, identity, "first", with_head=first) as peer:
        await welcomed(peer, identity, sent=True)
        assert online(gateway.gw.registry) == {identity.node_id}


@pytest.mark.parametrize("way", WAYS)
async def test_a_fragmented_message_is_one_frame_for_the_session(
    gateway: Running, way: str
) -> None:
    identity = new_identity()
    text = hello(identity)
    async with open_peer(gateway, identity, way) as peer:
        third = len(text) // 3
        await peer.write(TextMessage(data=text[:third], message_finished=False))
        await peer.write(TextMessage(data=text[third : 2 * third], message_finished=False))
        await peer.write(TextMessage(data=text[2 * third :], message_finished=True))
        await welcomed(peer, identity, sent=True)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(
    ("breaking", "code"),
    [
        (b"\x81\x05hello", 1002),  # an unmasked frame from a client
        (b"\x83\x80abcd", 1002),  # a reserved opcode
        (b"\x81\x82\0\0\0\0\xff\xfe", 1007),  # not UTF-8 (a zero mask)
    ],
    ids=["unmasked", "reserved-opcode", "not-utf8"],
)
async def test_a_frame_that_breaks_the_protocol_closes_only_that_node(
    gateway: Running, way: str, breaking: bytes, code: int
) -> None:
    honest, hostile = new_identity(), new_identity()
    registry = gateway.gw.registry
    async with open_peer(gateway, honest, "first") as good:
        await welcomed(good, honest)
        async with open_peer(gateway, hostile, way) as bad:
            await welcomed(bad, hostile)
            await bad.stream.send_all(breaking)
            # Hypercorn drops the connection without a close frame (1006 for the peer).
            assert await bad.closed_with() == (code if way == "first" else 1006)
        await wait_for(lambda: online(registry) == {honest.node_id})
        await good.write(Ping(payload=b"still"))
        with trio.fail_after(10):
            assert isinstance(await good.next_event(), Pong)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("fragments", [1, 5])
async def test_a_message_over_the_limit_is_refused_with_1009(
    nursery: trio.Nursery, tmp_path: Path, way: str, fragments: int
) -> None:
    gateway = await start_gateway(
        nursery, network_config(tmp_path, None, max_frame_bytes=str(64 * 1024))
    )
    identity = new_identity()
    async with open_peer(gateway, identity, way) as peer:
        await welcomed(peer, identity)
        # In one frame, or in fragments none of which is over the limit alone.
        size = 100_000 // fragments
        for n in range(fragments):
            last = n == fragments - 1
            await peer.write(TextMessage(data="x" * size, message_finished=last))
        assert await peer.closed_with() == 1009
    await wait_for(lambda: not online(gateway.gw.registry))


async def test_a_plain_get_on_the_node_path_is_answered_as_any_unknown_route(
    gateway: Running,
) -> None:
    async with gateway.client() as c:
        plain = await c.get(WS_PATH)
        unknown = await c.get("/v1/owlrun/elsewhere")
    assert plain.status_code == unknown.status_code == 404
    assert plain.json()["error"]["type"] == unknown.json()["error"]["type"]


async def test_a_connection_that_leaves_mid_head_costs_nothing(gateway: Running) -> None:
    with trio.fail_after(10):
        for cut in (b"GET /v1/ow", b"GET " + WS_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"):
            stream = await open_tcp(gateway)
            await stream.send_all(cut)
            await stream.aclose()
        async with httpx.AsyncClient(base_url=gateway.url) as c:
            assert (await c.get("/healthz")).status_code == 200


async def raw_exchange(gateway: Running, pieces: list[bytes]) -> bytes:
    """Write ``pieces`` on a new connection, a little apart; what comes back until the
    gateway closes or 2 s pass."""
    stream = await open_tcp(gateway)
    answer = b""
    try:
        with trio.fail_after(10):
            for piece in pieces:
                await stream.send_all(piece)
                await trio.sleep(0.02)
        with trio.move_on_after(2):
            while b"\r\n\r\n" not in answer:
                more = await stream.receive_some(65536)
                if not more:
                    break
                answer += more
    finally:
        await stream.aclose()
    return answer


@pytest.mark.parametrize(
    "pieces",
    [
        [b"GE", b"T /", b"healthz HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET /v1/nod", b"es/", b"ws", b"/more HTTP/1.1\r\nHost: x\r\n\r\n"],
    ],
    ids=["healthz", "a-longer-path"],
)
async def test_a_request_that_starts_like_the_node_sockets_is_served_as_any(
    gateway: Running, pieces: list[bytes]
) -> None:
    answer = await raw_exchange(gateway, pieces)
    expected = b"HTTP/1.1 200" if b"healthz" in pieces[-1] else b"HTTP/1.1 404"
    assert answer.startswith(expected), answer[:200]


async def test_a_node_head_over_the_bound_is_refused_by_the_http_server(
    gateway: Running,
) -> None:
    head = b"GET " + WS_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Pad: "
    # Never ended: the bound is what stops the wait for the rest.
    answer = await raw_exchange(gateway, [head, b"p" * (80 * 1024)])
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]  # header fields too large
    async with gateway.client() as c:
        assert (await c.get("/healthz")).status_code == 200


@pytest.mark.parametrize("sent", [b"GET /v1/nodes", b"GET /v1/nodes/ws HTTP/1.1\r\nHost: x\r\n"])
async def test_a_connection_reset_mid_head_is_no_failure(
    gateway: Running, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    # A reset (SO_LINGER 0) while the gateway waits for the rest of the head: the
    # peer is gone, which is not a failure of the server's to log.
    caplog.set_level(logging.WARNING, logger="routecat")
    with trio.fail_after(10):
        stream = await open_tcp(gateway)
        await stream.send_all(sent)
        await trio.sleep(0.05)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        async with gateway.client() as c:
            assert (await c.get("/healthz")).status_code == 200
        await trio.sleep(0.05)
        assert [r.getMessage() for r in caplog.records if r.name.startswith("routecat")] == []
