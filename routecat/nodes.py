"""The node registry and the node websocket.

Invariants: the receive loop of a node only decodes and dispatches
(``send_nowait`` into the bounded inbox of the job's current attempt); it never
awaits slow work, so one slow job cannot stall a node's other jobs, and one node
cannot stall another. A node that breaks the protocol (garbage, unknown types,
frames about jobs it was never given) is disconnected, and only it. Frames for a job
the gateway cancelled are expected (the node sent them before it saw the cancel) and
dropped quietly until the node acknowledges the cancel (protocol 2) or a grace period
ends: one client's disconnect never touches another job. A job whose client stops
reading overflows its own inbox: that job is cancelled as the client's doing, and
the node is not blamed. When a node goes away for any reason, every attempt it held
fails at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import attrs
import trio
from quart import websocket

from ledger.store import Connection, Store
from owlrun.protocol import (
    MIN_PROTOCOL_VERSION,
    NODE_HEADER,
    PROTOCOL_VERSION,
    SECRET_HEADER,
    Cancel,
    Cancelled,
    Chunk,
    Chunks,
    Done,
    Drain,
    Hardware,
    Heartbeat,
    Hello,
    JobError,
    Message,
    ModelInfo,
    ModelsUpdate,
    ProtocolError,
    Refused,
    Welcome,
    decode,
    encode,
)
from routecat.config import Config
from routecat.db import nodes as stored
from routecat.lightning.lnurl import LnurlError, parse_address
from routecat.metrics import Metrics

log = logging.getLogger("routecat.nodes")

NODE_ID = re.compile(r"[A-Za-z0-9_-]{4,64}")
MODEL_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
MAX_MODELS = 1000


def models_ok(models: list[ModelInfo]) -> bool:
    """A node's model list: at most 1,000 names of 1 to 200 characters, no control ones."""
    return len(models) <= MAX_MODELS and all(MODEL_NAME.fullmatch(m.name) for m in models)


KNOWN_FOR = 24 * 3600.0
INBOX_SIZE = 1024
OUTBOX_SIZE = 1024
EMA = 0.2
# How long frames for a cancelled job are dropped quietly when the node never
# acknowledges the cancel (a version-1 agent, or one that lost it).
CANCEL_GRACE = 60.0

NodeFrame = Chunk | Chunks | Done | JobError


@attrs.define(eq=False)
class Attempt:
    """One try of one job on one node; the node's frames for that job land in ``inbox``."""

    job_id: str
    node: NodeLink
    send: trio.MemorySendChannel[NodeFrame]
    inbox: trio.MemoryReceiveChannel[NodeFrame]
    failure: str | None = None
    ended: bool = False  # the node sent this attempt's done or error
    client_slow: bool = False  # the inbox overflowed: the client stopped reading
    # Called when the inbox overflows (the job's owner ends the job at once).
    on_overflow: Callable[[], None] | None = None

    @property
    def finished(self) -> bool:
        """Nothing more will come from the node for this attempt (no cancel needed)."""
        return self.ended or self.failure is not None

    def deliver_nowait(self, frame: NodeFrame) -> None:
        if isinstance(frame, Done | JobError):
            self.ended = True
        try:
            self.send.send_nowait(frame)
        except trio.WouldBlock:
            # The job's consumer (its client) is not keeping up: the client's doing.
            self.client_slow = True
            self.fail_nowait("the job's buffer overflowed (client not reading)")
            self.node.cancel_job(self.job_id, "client not reading")
            if self.on_overflow is not None:
                self.on_overflow()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def fail_nowait(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self.send.close()


@attrs.define(eq=False)
class NodeLink:
    """A connected node."""

    id: str
    name: str
    agent_version: str
    capacity: int
    models: dict[str, ModelInfo]
    hardware: Hardware
    payout_address: str
    payout_threshold_sats: int
    outbox: trio.MemorySendChannel[Message]
    connected_at: float
    last_seen: float
    protocol_version: int = PROTOCOL_VERSION
    clock: Callable[[], float] = trio.current_time
    attempts: dict[str, Attempt] = attrs.Factory(dict)
    # job id -> until when late frames for it are dropped quietly
    cancelled: dict[str, float] = attrs.Factory(dict)
    draining: bool = False
    cooldown_until: float = 0.0
    failures: int = 0
    jobs_done: int = 0
    ttft_ema: float | None = None
    tps_ema: float | None = None
    reputation: float = 1.0
    closed_reason: str | None = None
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    @property
    def in_flight(self) -> int:
        return len(self.attempts)

    def has_slot(self) -> bool:
        return not self.draining and self.closed_reason is None and self.in_flight < self.capacity

    def send_nowait(self, message: Message) -> bool:
        """Queue a frame for the node; a node whose queue is full is not reading: drop it."""
        try:
            self.outbox.send_nowait(message)
        except trio.WouldBlock:
            self.close("not reading its socket")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    def cancel_job(self, job_id: str, reason: str) -> None:
        """Tell the node to stop a job; its frames still in flight are then expected."""
        self.cancelled[job_id] = self.clock() + CANCEL_GRACE
        self.send_nowait(Cancel(job_id=job_id, reason=reason))

    def is_late(self, job_id: str) -> bool:
        """A frame for a job this node was given and the gateway cancelled (in grace)."""
        until = self.cancelled.get(job_id)
        return until is not None and until > self.clock()

    def forget_cancelled(self) -> None:
        now = self.clock()
        for job_id in [j for j, until in self.cancelled.items() if until <= now]:
            del self.cancelled[job_id]

    def open_attempt(self, job_id: str) -> Attempt:
        send, receive = trio.open_memory_channel[NodeFrame](INBOX_SIZE)
        attempt = Attempt(job_id, self, send, receive)
        self.attempts[job_id] = attempt
        return attempt

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            log.warning("closing node %s: %s", self.id, reason)
        self._scope.cancel()

    def observe(self, ttft: float | None, tokens: int, seconds: float) -> None:
        if ttft is not None:
            self.ttft_ema = (
                ttft if self.ttft_ema is None else (1 - EMA) * self.ttft_ema + EMA * ttft
            )
        if tokens > 1 and seconds > 0:
            tps = tokens / seconds
            self.tps_ema = tps if self.tps_ema is None else (1 - EMA) * self.tps_ema + EMA * tps

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "agent_version": self.agent_version,
            "models": sorted(self.models),
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "cooling_down_s": max(0.0, round(self.cooldown_until - now, 1)),
            "failures": self.failures,
            "jobs_done": self.jobs_done,
            "ttft_ms": None if self.ttft_ema is None else round(self.ttft_ema * 1000),
            "tokens_per_s": None if self.tps_ema is None else round(self.tps_ema, 1),
            "reputation": round(self.reputation, 3),
            "last_seen_s": round(now - self.last_seen, 1),
            "hardware": attrs.asdict(self.hardware),
        }


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@attrs.define(eq=False)
class Registry:
    """Online nodes, their models, and which models the network has seen lately."""

    store: Store
    metrics: Metrics
    clock: Callable[[], float] = trio.current_time
    wall: Callable[[], float] = time.time
    nodes: dict[str, NodeLink] = attrs.Factory(dict)
    model_seen: dict[str, float] = attrs.Factory(dict)
    catalog_models: frozenset[str] = frozenset()
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def load(self) -> None:
        self.model_seen = await self.store.read(stored.models_seen)

    def changed(self) -> None:
        """Wake everyone waiting for capacity; the next waiters get a fresh event."""
        self._changed.set()
        self._changed = trio.Event()
        self.metrics.nodes_online.set(len(self.nodes))

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def serving(self, model: str) -> list[NodeLink]:
        return [n for n in self.nodes.values() if model in n.models and n.closed_reason is None]

    def online_models(self) -> dict[str, list[NodeLink]]:
        out: dict[str, list[NodeLink]] = {}
        for node in self.nodes.values():
            if node.closed_reason is None:
                for model in node.models:
                    out.setdefault(model, []).append(node)
        return out

    def is_known(self, model: str) -> bool:
        """Known: in the price catalog, or advertised by some node within 24 hours."""
        if model in self.catalog_models or self.serving(model):
            return True
        seen = self.model_seen.get(model)
        return seen is not None and self.wall() - seen < KNOWN_FOR

    def pick(self, model: str, exclude: Iterable[str] = ()) -> NodeLink | None:
        """The best node with a free slot: least loaded, then fastest, then most reputable."""
        now = self.clock()
        excluded = set(exclude)
        best: NodeLink | None = None
        best_score = 0.0
        for node in self.serving(model):
            if node.id in excluded or not node.has_slot() or node.cooldown_until > now:
                continue
            load = (node.in_flight + 1) / node.capacity
            speed = node.tps_ema or 1.0
            score = load / (speed**0.5) / max(node.reputation, 0.05)
            if best is None or score < best_score:
                best, best_score = node, score
        return best

    async def remember_models(self, models: Iterable[str]) -> None:
        now = self.wall()
        names = list(models)
        for name in names:
            self.model_seen[name] = now

        if names:
            await self.store.write(lambda db: stored.remember_models(db, names, now))

    async def authenticate(self, hello: Hello, secret: str) -> str | None:
        """None if the node may connect, else the reason it may not. A new id is
        registered with its secret's hash; a known id must present the same secret."""
        digest = hash_secret(secret)

        def check(db: Connection) -> str | None:
            known = stored.node(db, hello.node_id)
            now = now_iso()
            settings = (hello.name, hello.payout_address, hello.payout_threshold_sats, now)
            if known is None:
                stored.insert_node(db, hello.node_id, digest, *settings)
                return None
            if not hmac.compare_digest(known.secret_hash, digest):
                return "wrong secret for this node id"
            if known.banned_at is not None:
                return f"node is banned: {known.ban_reason or 'no reason given'}"
            stored.update_node(db, hello.node_id, *settings)
            return None

        return await self.store.write(check)

    def statistics(self) -> dict[str, Any]:
        return {
            "nodes_online": len(self.nodes),
            "models_online": len(self.online_models()),
            "in_flight": sum(n.in_flight for n in self.nodes.values()),
        }


def _check_hello(hello: Hello, node_header: str, config: Config) -> str | None:
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
        try:
            parse_address(hello.payout_address)
        except LnurlError as exc:
            return f"payout address {hello.payout_address[:80]!r} is not a Lightning Address: {exc}"
    for field, value in (("name", hello.name), ("agent_version", hello.agent_version)):
        # Shown to operators in terminals and pages: printable text only.
        if len(value) > 64 or not value.isprintable():
            return f"{field} must be printable text of at most 64 characters"
    return None


async def _refuse(reason: str, retryable: bool = False) -> None:
    log.warning("refused a node: %s", reason)
    await websocket.send(encode(Refused(reason=reason, retryable=retryable)))
    # A close reason is at most 123 bytes of UTF-8.
    await websocket.close(1008, reason.encode()[:120].decode(errors="ignore"))


async def serve_node_socket(
    registry: Registry, config: Config, on_earnings: Callable[[NodeLink], Any] | None = None
) -> None:
    """The whole life of one node connection (the quart websocket route calls this)."""
    node_header = websocket.headers.get(NODE_HEADER, "")
    secret = websocket.headers.get(SECRET_HEADER, "")
    await websocket.accept()
    try:
        with trio.fail_after(10):
            frame = await websocket.receive()
        hello = decode(frame)
    except (ProtocolError, trio.TooSlowError) as exc:
        await _refuse(f"expected a hello frame first: {exc or 'timed out'}")
        return
    if not isinstance(hello, Hello):
        await _refuse(f"expected a hello frame first, got {hello.type}")
        return
    problem = _check_hello(hello, node_header, config)
    if problem is None and len(secret) < 16:
        problem = "missing or short X-Owlrun-Secret header"
    if problem is None:
        problem = await registry.authenticate(hello, secret)
    if problem is not None:
        await _refuse(problem)
        return

    now = registry.clock()
    send, outgoing = trio.open_memory_channel[Message](OUTBOX_SIZE)
    link = NodeLink(
        protocol_version=min(hello.protocol_version, PROTOCOL_VERSION),
        clock=registry.clock,
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
    registry.changed()
    log.info("node %s online: %d models, capacity %d", link.id, len(link.models), link.capacity)
    if on_earnings is not None:
        on_earnings(link)
    try:
        with link._scope:
            welcome = Welcome(
                node_id=link.id,
                protocol_version=link.protocol_version,
                heartbeat_interval=config.heartbeat_interval,
                payout_threshold_sats=link.payout_threshold_sats,
            )
            await websocket.send(encode(welcome))
            await registry.remember_models(list(link.models))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sender, outgoing)
                nursery.start_soon(_heartbeats, link, config.heartbeat_interval)
                await _receive_loop(registry, link, config, nursery)
    finally:
        if registry.nodes.get(link.id) is link:
            del registry.nodes[link.id]
        send.close()
        for attempt in list(link.attempts.values()):
            attempt.fail_nowait(f"node disconnected ({link.closed_reason or 'connection lost'})")
        registry.changed()
        log.info("node %s offline: %s", link.id, link.closed_reason or "connection closed")


async def _sender(outgoing: trio.MemoryReceiveChannel[Message]) -> None:
    async for message in outgoing:
        await websocket.send(encode(message))


async def _heartbeats(link: NodeLink, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        link.send_nowait(Heartbeat(in_flight=link.in_flight))
        link.forget_cancelled()


async def _receive_loop(
    registry: Registry, link: NodeLink, config: Config, nursery: trio.Nursery
) -> None:
    silence = config.heartbeat_interval * config.heartbeat_misses
    while True:
        with trio.move_on_after(silence) as timer:
            frame = await websocket.receive()
        if timer.cancelled_caught:
            link.close(f"no heartbeat for {silence:g}s")
            return
        link.last_seen = registry.clock()
        if len(frame) > config.max_frame_bytes:
            link.close("frame over the size limit")
            return
        try:
            message = decode(frame)
        except ProtocolError as exc:
            registry.metrics.protocol_violations.labels("closed").inc()
            link.close(f"protocol violation: {exc}")
            return
        if isinstance(message, Chunk | Chunks | Done | JobError):
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
            pass
        elif isinstance(message, ModelsUpdate):
            if not models_ok(message.models):
                link.close("malformed models update")
                return
            link.models = {m.name: m for m in message.models}
            # Persisting is slow work: never inside the receive loop.
            nursery.start_soon(registry.remember_models, list(link.models))
            registry.changed()
            log.info("node %s now serves %d models", link.id, len(link.models))
        elif isinstance(message, Drain):
            link.draining = True
            registry.changed()
            log.info("node %s is draining: %s", link.id, message.reason)
        else:
            link.close(f"unexpected {message.type} frame from a node")
            return
