"""One node's connection, from hello to goodbye, over an injected transport.

Invariants: the receive loop only decodes and dispatches (``send_nowait`` into the
bounded inbox of the job's current attempt); it never awaits slow work, so one slow
job cannot stall a node's other jobs, and one node cannot stall another. A node that
breaks the protocol (garbage, unknown types, frames about jobs it was never given) is
disconnected, and only it. Frames for a job the gateway cancelled are expected (the
node sent them before it saw the cancel) and dropped quietly until the node
acknowledges the cancel (protocol 2) or a grace period ends: one client's disconnect
never touches another job. When a node goes away for any reason, every attempt it
held fails at once.

The transport is three callables (``Transport``): the web framework's websocket in
``routecat.api.nodes``, memory channels in the unit tests. Nothing here imports one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from owlrun.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    QUIET_GATEWAY_PROTOCOL,
    Cancelled,
    Chunk,
    Chunks,
    Done,
    Drain,
    Embedded,
    Heartbeat,
    Hello,
    JobError,
    Message,
    ModelsUpdate,
    ProtocolError,
    Refused,
    Welcome,
    decode,
    encode,
)
from routecat.config import Config
from routecat.network.link import NativeLink
from routecat.network.registry import NODE_ID, Registry, models_ok

log = logging.getLogger("routecat.network")

SWEEP_PERIOD = 1.0  # at most, seconds between two looks for silent nodes


def outbox_size(capacity: int) -> int:
    """Frames queued for a node before it counts as not reading: one job and one
    cancel per slot, plus heartbeats and the like, so that a burst of jobs up to its
    capacity never closes an honest node that reads a little late."""
    return 2 * capacity + 64


@attrs.frozen
class Transport:
    """A node's socket as the session sees it: text frames in and out, and a close."""

    send: Callable[[str], Awaitable[None]]
    receive: Callable[[], Awaitable[str | bytes]]
    close: Callable[[int, str], Awaitable[None]]


def _check_hello(hello: Hello, node_header: str, registry: Registry) -> str | None:
    if hello.protocol_version < MIN_PROTOCOL_VERSION:
        return (
            f"protocol version {hello.protocol_version} is not supported"
            f" (need {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION})"
        )
    if not NODE_ID.fullmatch(hello.node_id) or hello.node_id != node_header:
        return "node id missing, malformed, or different from the X-Owlrun-Node header"
    if not 1 <= hello.max_concurrency <= 4096:
        return "max_concurrency must be between 1 and 4096"
    if not models_ok(hello.models):
        return "too many models or a malformed model name"
    if hello.payout_address:
        why = registry.address_problem(hello.payout_address)
        if why is not None:
            return f"payout address {hello.payout_address[:80]!r} is not a Lightning Address: {why}"
    for field, value in (("name", hello.name), ("agent_version", hello.agent_version)):
        # Shown to operators in terminals and pages: printable text only.
        if len(value) > 64 or not value.isprintable():
            return f"{field} must be printable text of at most 64 characters"
    return None


async def _refuse(transport: Transport, reason: str, retryable: bool = False) -> None:
    log.warning("refused a node: %s", reason)
    await transport.send(encode(Refused(reason=reason, retryable=retryable)))
    # A close reason is at most 123 bytes of UTF-8.
    await transport.close(1008, reason.encode()[:120].decode(errors="ignore"))


async def serve_node_session(
    registry: Registry,
    config: Config,
    transport: Transport,
    *,
    node_header: str,
    secret: str,
    on_online: Callable[[NativeLink], Any] | None = None,
) -> None:
    """The whole life of one node connection, from an accepted socket (whose
    ``X-Owlrun-Node`` and ``X-Owlrun-Secret`` headers are given) to its end."""
    try:
        with trio.fail_after(10):
            frame = await transport.receive()
        hello = decode(frame)
    except (ProtocolError, trio.TooSlowError) as exc:
        await _refuse(transport, f"expected a hello frame first: {exc or 'timed out'}")
        return
    if not isinstance(hello, Hello):
        await _refuse(transport, f"expected a hello frame first, got {hello.type}")
        return
    problem = _check_hello(hello, node_header, registry)
    if problem is None and len(secret) < 16:
        problem = "missing or short X-Owlrun-Secret header"
    if problem is None:
        problem = await registry.authenticate(hello, secret)
    if problem is not None:
        await _refuse(transport, problem)
        return

    now = registry.clock.monotonic()
    send, outgoing = trio.open_memory_channel[Message](outbox_size(hello.max_concurrency))
    link = NativeLink(
        protocol_version=min(hello.protocol_version, PROTOCOL_VERSION),
        clock=registry.clock.monotonic,
        id=hello.node_id,
        name=hello.name,
        agent_version=hello.agent_version,
        capacity=hello.max_concurrency,
        models={m.name: m for m in hello.models},
        hardware=hello.hardware,
        payout_address=hello.payout_address,
        payout_threshold_sats=config.payout_threshold(hello.payout_threshold_sats),
        outbox=send,
        connected_at=now,
        last_seen=now,
    )
    old = registry.nodes.get(link.id)
    if old is not None:
        old.close("replaced by a new connection of the same node")
    registry.nodes[link.id] = link
    registry.membership_changed()
    log.info("node %s online: %d models, capacity %d", link.id, len(link.models), link.capacity)
    if on_online is not None:
        on_online(link)
    try:
        with link.scope:
            welcome = Welcome(
                node_id=link.id,
                protocol_version=link.protocol_version,
                heartbeat_interval=config.heartbeat_interval,
                payout_threshold_sats=link.payout_threshold_sats,
            )
            await transport.send(encode(welcome))
            await registry.remember_models(list(link.models))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sender, transport, outgoing)
                await _receive_loop(registry, link, config, transport, nursery)
    finally:
        if registry.nodes.get(link.id) is link:
            del registry.nodes[link.id]
        send.close()
        for attempt in list(link.attempts.values()):
            attempt.fail_nowait(f"node disconnected ({link.closed_reason or 'connection lost'})")
        registry.membership_changed()
        log.info("node %s offline: %s", link.id, link.closed_reason or "connection closed")


async def _sender(transport: Transport, outgoing: trio.MemoryReceiveChannel[Message]) -> None:
    async for message in outgoing:
        await transport.send(encode(message))


async def evict_silent(
    registry: Registry,
    config: Config,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Close every node of ours that has said nothing for ``heartbeat_misses``
    intervals, within a sweep period (a second at most) of that.

    One task for all nodes: a sleeping watchdog per node cost a timer's expiry (a
    Cancelled raised and caught) per node per silence period, a tenth of the idle CPU
    of 10,000 nodes, where a sweep over them costs about a millisecond. A frame only
    moves ``link.last_seen``.
    """
    silence = config.heartbeat_interval * config.heartbeat_misses
    period = min(SWEEP_PERIOD, config.heartbeat_interval / 2)
    reason = f"no heartbeat for {silence:g}s"
    task_status.started()
    while True:
        await trio.sleep(period)
        cutoff = registry.clock.monotonic() - silence
        for link in [
            link
            for link in registry.nodes.values()
            if isinstance(link, NativeLink) and link.last_seen <= cutoff
        ]:
            link.close(reason)


async def _receive_loop(
    registry: Registry,
    link: NativeLink,
    config: Config,
    transport: Transport,
    nursery: trio.Nursery,
) -> None:
    # Before version 4 the gateway's heartbeat answers the node's, at most one per half
    # interval (a node that beats faster gets no more): one timer fewer per node. From
    # version 4 it is not answered (the agent pings when the gateway has been quiet):
    # an answer cost the gateway more than the heartbeat it answered.
    answered = -math.inf
    while True:
        frame = await transport.receive()
        link.last_seen = now = registry.clock.monotonic()
        if len(frame) > config.max_frame_bytes:
            link.close("frame over the size limit")
            return
        try:
            message = decode(frame)
        except ProtocolError as exc:
            registry.metrics.protocol_violations.labels("closed").inc()
            link.close(f"protocol violation: {exc}")
            return
        if isinstance(message, Chunk | Chunks | Done | Embedded | JobError):
            attempt = link.attempts.get(message.job_id)
            if attempt is None:
                if link.is_late(message.job_id):
                    registry.metrics.protocol_violations.labels("late_frame_dropped").inc()
                    continue
                registry.metrics.protocol_violations.labels("closed").inc()
                link.close(f"{message.type} frame for a job it was never given")
                return
            if isinstance(message, Done) and message.violation:
                registry.metrics.protocol_violations.labels("usage_ignored").inc()
                log.warning("node %s: invalid done frame: %s", link.id, message.violation)
            attempt.deliver_nowait(message)
        elif isinstance(message, Cancelled):
            # The node will send nothing more for that job. An acknowledgement that comes
            # after the grace period (or twice) is harmless: it changes nothing.
            link.cancelled.pop(message.job_id, None)
        elif isinstance(message, Heartbeat):
            if now - answered >= config.heartbeat_interval / 2:
                answered = now
                if link.protocol_version < QUIET_GATEWAY_PROTOCOL:
                    link.send_nowait(Heartbeat(in_flight=link.in_flight))
                link.forget_cancelled()
        elif isinstance(message, ModelsUpdate):
            if not models_ok(message.models):
                link.close("malformed models update")
                return
            link.models = {m.name: m for m in message.models}
            # Persisting is slow work: never inside the receive loop.
            nursery.start_soon(registry.remember_models, list(link.models))
            registry.membership_changed()
            log.info("node %s now serves %d models", link.id, len(link.models))
        elif isinstance(message, Drain):
            link.draining = True
            registry.membership_changed()
            log.info("node %s is draining: %s", link.id, message.reason)
        else:
            link.close(f"unexpected {message.type} frame from a node")
            return
