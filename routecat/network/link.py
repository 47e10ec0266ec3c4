"""A connected node as the gateway's logic sees it, and one attempt of one job on it.

Invariants: a link never awaits: frames for the node are queued on its bounded outbox
(a node whose outbox is full is not reading its socket and is closed), frames from
the node are handed to the inbox of the job's current attempt with ``send_nowait``.
One client's slow reading overflows only its own attempt's inbox: that job is
cancelled as the client's doing and the node is not blamed. A link's counters
(failures, cooldown, speed, reputation) change only through its methods.

``NodeLink`` is the protocol the scheduler, registry, reputation and billing use;
``NativeLink`` implements it for owlrun's protocol (the session in ``session.py``
moves its frames over a websocket); another agent protocol supplies another link.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

import attrs
import trio

from owlrun.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Chunks,
    Done,
    Embedded,
    Hardware,
    JobError,
    Message,
    ModelInfo,
)

log = logging.getLogger("routecat.network")

INBOX_SIZE = 1024
EMA = 0.2
PENALTY = 0.5
RECOVERY = 0.05
# How long frames for a cancelled job are dropped quietly when the node never
# acknowledges the cancel (a version-1 agent, or one that lost it).
CANCEL_GRACE = 60.0

NodeFrame = Chunk | Chunks | Done | Embedded | JobError


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
        if isinstance(frame, Done | Embedded | JobError):
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


class NodeLink(Protocol):
    """What the network's logic needs of a connected node, whatever its agent speaks."""

    id: str
    name: str
    capacity: int
    models: dict[str, ModelInfo]
    payout_threshold_sats: int
    attempts: dict[str, Attempt]
    draining: bool
    cooldown_until: float
    reputation: float
    tps_ema: float | None
    closed_reason: str | None
    protocol_version: int

    @property
    def in_flight(self) -> int: ...

    def has_slot(self) -> bool: ...

    def send_nowait(self, message: Message) -> bool: ...

    def cancel_job(self, job_id: str, reason: str) -> None: ...

    def open_attempt(self, job_id: str) -> Attempt: ...

    def close(self, reason: str) -> None: ...

    def succeeded(self, ttft: float | None, tokens: int, seconds: float) -> None: ...

    def failed(self, now: float) -> float: ...

    def judged(self, reason: str | None, now: float, cooldown: float) -> None: ...

    def describe(self, now: float) -> dict[str, Any]: ...


class LinkCounters:
    """The bookkeeping every kind of link shares: attempts, slots, failures and
    cooldowns, speed averages, reputation. A link class provides the fields."""

    attempts: dict[str, Attempt]
    capacity: int
    draining: bool
    closed_reason: str | None
    cooldown_until: float
    failures: int
    jobs_done: int
    ttft_ema: float | None
    tps_ema: float | None
    reputation: float

    @property
    def in_flight(self) -> int:
        return len(self.attempts)

    def has_slot(self) -> bool:
        return not self.draining and self.closed_reason is None and self.in_flight < self.capacity

    def open_attempt(self, job_id: str) -> Attempt:
        send, receive = trio.open_memory_channel[NodeFrame](INBOX_SIZE)
        attempt = Attempt(job_id, cast(NodeLink, self), send, receive)
        self.attempts[job_id] = attempt
        return attempt

    def succeeded(self, ttft: float | None, tokens: int, seconds: float) -> None:
        """A job done: failures forgotten, speed averages updated."""
        self.failures = 0
        self.jobs_done += 1
        if ttft is not None:
            self.ttft_ema = (
                ttft if self.ttft_ema is None else (1 - EMA) * self.ttft_ema + EMA * ttft
            )
        if tokens > 1 and seconds > 0:
            tps = tokens / seconds
            self.tps_ema = tps if self.tps_ema is None else (1 - EMA) * self.tps_ema + EMA * tps

    def failed(self, now: float) -> float:
        """A failure the node is to blame for: cool it down, longer each time in a row.
        Returns the pause in seconds."""
        self.failures += 1
        pause: float = min(300.0, 5.0 * 2.0 ** (self.failures - 1))
        self.cooldown_until = now + pause
        return pause

    def judged(self, reason: str | None, now: float, cooldown: float) -> None:
        """The usage check's verdict on one job: honest (None) restores reputation slowly,
        dishonest halves it and cools the node down."""
        if reason is None:
            self.reputation = min(1.0, self.reputation + RECOVERY)
        else:
            self.reputation = max(0.05, self.reputation * PENALTY)
            self.cooldown_until = max(self.cooldown_until, now + cooldown)

    def counters(self, now: float) -> dict[str, Any]:
        """What ``describe`` shows of the bookkeeping, for every kind of link."""
        return {
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "cooling_down_s": max(0.0, round(self.cooldown_until - now, 1)),
            "failures": self.failures,
            "jobs_done": self.jobs_done,
            "ttft_ms": None if self.ttft_ema is None else round(self.ttft_ema * 1000),
            "tokens_per_s": None if self.tps_ema is None else round(self.tps_ema, 1),
            "reputation": round(self.reputation, 3),
        }


@attrs.define(eq=False)
class NativeLink(LinkCounters):
    """A node running owlrun (or anything that speaks its protocol)."""

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
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)  # the session's

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

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            log.warning("closing node %s: %s", self.id, reason)
        self.scope.cancel()

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "native",
            "name": self.name,
            "agent_version": self.agent_version,
            "models": sorted(self.models),
            **self.counters(now),
            "last_seen_s": round(now - self.last_seen, 1),
            "hardware": attrs.asdict(self.hardware),
        }
