"""A node's session over a memory transport, in virtual time: hello, heartbeats,
late frames after a cancel, and what closes a node (and only it)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs
import pytest
import trio

from owlrun.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    QUIET_GATEWAY_PROTOCOL,
    Chunk,
    Delta,
    Heartbeat,
    Hello,
    Message,
    ModelInfo,
    Welcome,
    decode,
    encode,
)
from routecat.config import Config
from routecat.network.link import CANCEL_GRACE
from routecat.network.registry import Registry
from routecat.network.session import Transport, evict_silent, serve_node_session
from tests.unit.network.fakes import registry

CONFIG = Config(heartbeat_interval=10.0, heartbeat_misses=3)


@attrs.define
class Peer:
    """The node's end of the socket."""

    to_gateway: trio.MemorySendChannel[str]
    from_gateway: trio.MemoryReceiveChannel[str]
    closed: list[tuple[int, str]]
    ended: trio.Event

    async def send(self, message: Message | str) -> None:
        await self.to_gateway.send(message if isinstance(message, str) else encode(message))

    async def receive(self) -> Message:
        return decode(await self.from_gateway.receive())


def hello(node_id: str = "node-1", version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(
        node_id=node_id,
        agent_version="test",
        protocol_version=version,
        models=[ModelInfo(name="m")],
        max_concurrency=2,
    )


@pytest.fixture
async def connect() -> AsyncIterator[tuple[Registry, object]]:
    reg = registry()
    async with trio.open_nursery() as nursery:
        await nursery.start(evict_silent, reg, CONFIG)

        async def open_peer(node_id: str = "node-1", version: int = PROTOCOL_VERSION) -> Peer:
            to_gateway, gateway_in = trio.open_memory_channel[str](100)
            gateway_out, from_gateway = trio.open_memory_channel[str](100)
            peer = Peer(to_gateway, from_gateway, [], trio.Event())

            async def close(code: int, reason: str) -> None:
                peer.closed.append((code, reason))

            async def session() -> None:
                try:
                    await serve_node_session(
                        reg,
                        CONFIG,
                        Transport(gateway_out.send, gateway_in.receive, close),
                        node_header=node_id,
                        secret="s" * 32,
                    )
                finally:
                    peer.ended.set()

            nursery.start_soon(session)
            await peer.send(hello(node_id, version))
            assert isinstance(await peer.receive(), Welcome)
            return peer

        yield reg, open_peer
        nursery.cancel_scope.cancel()


async def test_silence_closes_the_node_after_the_missed_heartbeats(connect, autojump_clock) -> None:
    reg, open_peer = connect
    peer = await open_peer()
    link = reg.nodes["node-1"]
    attempt = link.open_attempt("chatcmpl-1")
    began = trio.current_time()
    await peer.ended.wait()
    # Three intervals of silence, noticed by the next sweep (at most a second later).
    assert 30.0 <= trio.current_time() - began <= 31.0
    assert link.closed_reason == "no heartbeat for 30s"
    assert "node-1" not in reg.nodes
    assert attempt.failure == "node disconnected (no heartbeat for 30s)"


async def received(peer: Peer) -> list[Message]:
    """What the gateway sent the peer that it has not read yet."""
    messages: list[Message] = []
    while True:
        with trio.move_on_after(0.1):
            messages.append(await peer.receive())
            continue
        return messages


@pytest.mark.parametrize("version", range(MIN_PROTOCOL_VERSION, QUIET_GATEWAY_PROTOCOL))
async def test_heartbeats_keep_a_node_and_the_gateway_answers_each(
    connect, autojump_clock, version: int
) -> None:
    reg, open_peer = connect
    peer = await open_peer(version=version)
    for _ in range(10):  # 100 virtual seconds
        await peer.send(Heartbeat())
        assert isinstance(await peer.receive(), Heartbeat)
        await trio.sleep(10)
    assert reg.nodes["node-1"].closed_reason is None
    # A node that beats faster than every half interval gets no more answers.
    for _ in range(20):
        await peer.send(Heartbeat())
        await trio.sleep(0.5)
    answers = await received(peer)
    assert len(answers) == 2  # 10 s of beats: one answer per 5 s
    assert all(isinstance(a, Heartbeat) for a in answers)
    assert reg.nodes["node-1"].closed_reason is None


@pytest.mark.parametrize("version", range(QUIET_GATEWAY_PROTOCOL, PROTOCOL_VERSION + 1))
async def test_from_version_4_heartbeats_keep_a_node_unanswered(
    connect, autojump_clock, version: int
) -> None:
    reg, open_peer = connect
    peer = await open_peer(version=version)
    for _ in range(30):  # 300 virtual seconds, ten times the eviction silence
        await peer.send(Heartbeat())
        await trio.sleep(10)
    assert await received(peer) == []
    assert reg.nodes["node-1"].closed_reason is None
    await trio.sleep(30)  # then silence still evicts it
    await peer.ended.wait()
    assert reg.nodes.get("node-1") is None


async def test_the_sweep_closes_the_silent_nodes_and_only_them(connect, autojump_clock) -> None:
    reg, open_peer = connect
    peers = {f"node-{i}": await open_peer(f"node-{i}") for i in range(6)}
    await trio.sleep(3.3)  # the nodes fall out of step with the sweeps
    beating = ["node-0", "node-2", "node-3"]
    for _ in range(8):  # 80 s: the others fell silent 3.3 s into their lives
        for node_id in beating:
            await peers[node_id].send(Heartbeat())
        await trio.sleep(10)
    assert sorted(reg.nodes) == beating
    for node_id, peer in peers.items():
        assert peer.ended.is_set() == (node_id not in beating)


async def test_late_frames_are_dropped_in_grace_then_close_the_node(
    connect, autojump_clock
) -> None:
    reg, open_peer = connect
    peer = await open_peer()
    other = await open_peer("node-2")
    link = reg.nodes["node-1"]
    attempt = link.open_attempt("chatcmpl-1")
    del link.attempts["chatcmpl-1"]
    link.cancel_job(attempt.job_id, "client gone")
    assert (await peer.receive()).type == "cancel"
    for _ in range(5):  # frames the node sent before it saw the cancel
        await peer.send(Chunk(job_id="chatcmpl-1", delta=Delta(content="late")))
        await trio.sleep(CANCEL_GRACE / 10)
        await peer.send(Heartbeat())
        await other.send(Heartbeat())
    assert link.closed_reason is None
    for _ in range(6):  # past the grace period, still beating
        await trio.sleep(CANCEL_GRACE / 10)
        await peer.send(Heartbeat())
        await other.send(Heartbeat())
    # After the grace period, a frame about that job is a protocol violation.
    await peer.send(Chunk(job_id="chatcmpl-1", delta=Delta(content="very late")))
    await peer.ended.wait()
    assert link.closed_reason == "chunk frame for a job it was never given"
    assert "node-1" not in reg.nodes and reg.nodes["node-2"].closed_reason is None


async def test_garbage_closes_only_that_node(connect, autojump_clock) -> None:
    reg, open_peer = connect
    peer = await open_peer()
    other = await open_peer("node-2")
    await peer.send("{not json")
    await peer.ended.wait()
    assert reg.nodes.keys() == {"node-2"}
    await other.send(Heartbeat())
    assert reg.nodes["node-2"].closed_reason is None


async def test_a_known_id_with_another_secret_is_refused(connect, autojump_clock) -> None:
    reg, open_peer = connect
    await open_peer()
    to_gateway, gateway_in = trio.open_memory_channel[str](10)
    gateway_out, from_gateway = trio.open_memory_channel[str](10)
    closed: list[tuple[int, str]] = []

    async def close(code: int, reason: str) -> None:
        closed.append((code, reason))

    await to_gateway.send(encode(hello()))
    await serve_node_session(
        reg,
        CONFIG,
        Transport(gateway_out.send, gateway_in.receive, close),
        node_header="node-1",
        secret="t" * 32,
    )
    refused = decode(await from_gateway.receive())
    assert refused.type == "refused" and refused.reason == "wrong secret for this node id"
    assert closed == [(1008, "wrong secret for this node id")]
    assert reg.nodes["node-1"].closed_reason is None  # the real node-1 is untouched
