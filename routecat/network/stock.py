"""Stock Go Owlrun agents as nodes (the compatibility mode, off by default).

The stock agent speaks its own protocol (``docs/providers.md``, "Stock Owlrun
agents"): HTTP registration, a websocket authenticated by its provider key, ``job`` ->
``accept``/``reject``, the request fetched by job id, the engine's raw SSE relayed in
``proxy_chunk`` pieces that may split lines, ``proxy_done``, and no cancel but a closed
socket. ``StockLink`` makes such an agent one more ``NodeLink``: it turns the
scheduler's ``Job`` into the agent's ``job`` frame plus a request kept for one fetch,
and reassembles the relayed SSE into the same ``Chunk`` and ``Done`` frames a native
node sends, so the scheduler, billing (usage verified like any node's) and reputation
are unchanged.

Invariants: a request is served once, only to the assigned node's key, and expires;
frames about a job the link no longer holds are dropped (the agent cannot be told to
stop); a job is cancelled by closing the socket only when no other job is on it, else
it runs out and its output is discarded (billed as "client left"); nothing the agent
sends can raise out of the reassembler: a malformed piece fails that job only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import attrs
import trio

from owlrun.protocol import (
    FINISH_REASONS,
    Chunk,
    Delta,
    Done,
    Job,
    JobError,
    Message,
    ModelInfo,
    Usage,
    token_count,
)
from routecat.network.link import Attempt, LinkCounters

log = logging.getLogger("routecat.network.stock")

MAX_PENDING_SSE = 1024 * 1024  # an SSE line longer than this fails its job


@attrs.define(eq=False)
class Pending:
    """A request kept for the one fetch its job allows."""

    key_hash: str
    body: dict[str, Any]
    expires: float


@attrs.define(eq=False)
class Reassembler:
    """The relayed SSE of one job, back into deltas, usage and a finish reason."""

    buffer: str = ""
    usage: Usage | None = None
    finish_reason: str | None = None
    violation: str = ""  # the relayed usage or finish reason was invalid: not trusted

    def feed(self, data: str) -> list[Delta]:
        self.buffer += data
        if len(self.buffer) > MAX_PENDING_SSE:
            raise ValueError("an SSE line over the size limit")
        deltas: list[Delta] = []
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            line = line.strip("\r")
            if not line.startswith("data:"):
                continue  # comments, event names, blank lines
            payload = line[5:].strip()
            if payload == "[DONE]" or not payload:
                continue
            deltas += self._chunk(json.loads(payload))
        return deltas

    def _chunk(self, chunk: Any) -> list[Delta]:
        if not isinstance(chunk, dict):
            raise ValueError("an SSE event that is not an object")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            try:
                prompt = token_count(usage.get("prompt_tokens"))
                completion = token_count(usage.get("completion_tokens"))
            except ValueError as exc:
                self.violation = f"invalid usage: {exc}"
            else:
                self.usage = Usage(prompt, completion)
        out = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                continue
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            calls = []
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict) or not isinstance(call.get("index"), int):
                    continue
                found_fn = call.get("function")
                fn: dict[str, Any] = found_fn if isinstance(found_fn, dict) else {}
                piece: dict[str, Any] = {"index": call["index"], "type": "function"}
                if isinstance(call.get("id"), str):
                    piece["id"] = call["id"]
                function = {k: fn[k] for k in ("name", "arguments") if isinstance(fn.get(k), str)}
                if function:
                    piece["function"] = function
                calls.append(piece)
            found = Delta(
                content=delta.get("content") if isinstance(delta.get("content"), str) else None,
                reasoning=reasoning if isinstance(reasoning, str) else None,
                refusal=delta.get("refusal") if isinstance(delta.get("refusal"), str) else None,
                tool_calls=calls or None,
            )
            if not found.is_empty():
                out.append(found)
            reason = choice.get("finish_reason")
            if reason is not None:
                if reason in FINISH_REASONS:
                    self.finish_reason = reason
                else:
                    self.violation = f"invalid finish_reason {str(reason)[:40]!r}"
        return out


@attrs.define(eq=False)
class StockLink(LinkCounters):
    """A stock Go agent on its websocket (frames go out through ``send_frame``)."""

    id: str
    name: str
    agent_version: str
    capacity: int
    models: dict[str, ModelInfo]
    key_hash: str
    send_frame: Callable[[dict[str, Any]], bool]
    close_socket: Callable[[str], None]
    connected_at: float
    last_seen: float
    payout_threshold_sats: int = 0
    fetch_timeout: float = 10.0  # an accepted job's request waits this long for its fetch
    protocol_version: int = 1  # chat jobs only: never sent embedding jobs
    kind: str = "stock"
    attempts: dict[str, Attempt] = attrs.Factory(dict)
    pending: dict[str, Pending] = attrs.Factory(dict)  # job id -> request to fetch
    streams: dict[str, Reassembler] = attrs.Factory(dict)
    draining: bool = False
    cooldown_until: float = 0.0
    failures: int = 0
    jobs_done: int = 0
    ttft_ema: float | None = None
    tps_ema: float | None = None
    reputation: float = 1.0
    closed_reason: str | None = None
    clock: Callable[[], float] = time.monotonic

    def send_nowait(self, message: Message) -> bool:
        if not isinstance(message, Job):
            return True  # the agent has no frame for it (heartbeats, earnings: its own)
        body = {k: v for k, v in message.request.items() if k not in ("n",)}
        body["model"] = message.model
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        expires = self.clock() + self.fetch_timeout
        self.pending[message.job_id] = Pending(self.key_hash, body, expires)
        self.streams[message.job_id] = Reassembler()
        return self.send_frame({"type": "job", "job_id": message.job_id, "model": message.model})

    def fetch(self, job_id: str, key_hash: str) -> dict[str, Any] | None:
        """The job's request, once, for the assigned node's key, before it expires."""
        pending = self.pending.get(job_id)
        if pending is None or pending.key_hash != key_hash:
            return None
        del self.pending[job_id]
        return pending.body if pending.expires > self.clock() else None

    def cancel_job(self, job_id: str, reason: str) -> None:
        """The agent has no cancel: close its socket if this job is its only one; else
        the job runs out on the engine and its frames are dropped here."""
        self.pending.pop(job_id, None)
        self.streams.pop(job_id, None)
        if not self.attempts or set(self.attempts) <= {job_id}:
            self.close(f"job cancelled ({reason})")

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            log.warning("closing stock node %s: %s", self.id, reason)
        self.close_socket(reason)

    def frame(self, data: dict[str, Any]) -> None:
        """One frame from the agent about a job (accept, reject, proxy_chunk, proxy_done)."""
        kind, job_id = data.get("type"), data.get("job_id")
        if not isinstance(job_id, str):
            return
        attempt = self.attempts.get(job_id)
        if attempt is None:
            return  # a job it no longer holds (cancelled, or never): dropped
        if kind == "accept":
            return
        if kind == "reject":
            reason = str(data.get("reason", ""))[:100]
            attempt.deliver_nowait(JobError(job_id, f"rejected: {reason}", True))
            return
        stream = self.streams.get(job_id)
        if stream is None:
            return
        try:
            if kind == "proxy_chunk":
                piece = data.get("data")
                if not isinstance(piece, str):
                    raise ValueError("a proxy_chunk without string data")
                for delta in stream.feed(piece):
                    attempt.deliver_nowait(Chunk(job_id, delta))
            elif kind == "proxy_done":
                stream.feed("\n")
                self.streams.pop(job_id, None)
                if stream.violation:
                    done = Done(job_id, "stop", None, violation=stream.violation)
                else:
                    done = Done(job_id, stream.finish_reason or "stop", stream.usage)
                attempt.deliver_nowait(done)
        except (ValueError, TypeError) as exc:
            self.streams.pop(job_id, None)
            attempt.deliver_nowait(JobError(job_id, f"malformed relay: {exc}"[:200], False))

    def forget_expired(self) -> None:
        """Requests not fetched in time are dropped, and their jobs fail before the first
        token (so they fail over): the agent accepted and went quiet, or never answered."""
        now = self.clock()
        for job_id in [j for j, p in self.pending.items() if p.expires <= now]:
            del self.pending[job_id]
            self.streams.pop(job_id, None)
            attempt = self.attempts.get(job_id)
            if attempt is not None:
                why = f"the agent did not fetch the job's request within {self.fetch_timeout:g}s"
                attempt.deliver_nowait(JobError(job_id, why, True))

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "stock",
            "name": self.name,
            "agent_version": self.agent_version,
            "models": sorted(self.models),
            **self.counters(now),
            "last_seen_s": round(now - self.last_seen, 1),
            "hardware": {},
        }


def fetch_request(nodes: Iterable[object], job_id: str, key_hash: str) -> dict[str, Any] | None:
    """The request of a job held by one of these links, for that node's key, once."""
    for node in nodes:
        if isinstance(node, StockLink) and job_id in node.pending:
            return node.fetch(job_id, key_hash)
    return None


# -- the session ----------------------------------------------------------------------

PING_INTERVAL = 10.0  # the agent answers a ping at once: a dead agent is seen in seconds
SILENCE = 90.0  # its own heartbeats come every 30 s


@attrs.define(eq=False)
class Registration:
    """What a stock agent said when it registered (its models and version)."""

    node_id: str
    models: list[str]
    version: str
    threshold_sats: int


async def serve_stock_session(
    registry: Any,
    transport: Any,
    registration: Registration,
    key_hash: str,
    *,
    capacity: int,
    threshold_sats: int,
    fetch_timeout: float = 10.0,
    earnings: Callable[[str], Awaitable[dict[str, Any]]] | None = None,
) -> None:
    """One stock agent's websocket, from its first frame to its end: frames out through
    a bounded queue, frames in dispatched without awaiting slow work, pinged, and
    closed after ``SILENCE`` seconds without a word."""
    send, outgoing = trio.open_memory_channel[dict[str, Any]](256)
    scope = trio.CancelScope()

    def send_frame(frame: dict[str, Any]) -> bool:
        try:
            send.send_nowait(frame)
        except trio.WouldBlock:
            link.close("not reading its socket")
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    now = trio.current_time()
    link = StockLink(
        id=registration.node_id,
        name="",
        agent_version=registration.version,
        capacity=capacity,
        models={m: ModelInfo(name=m) for m in registration.models},
        key_hash=key_hash,
        send_frame=send_frame,
        close_socket=lambda reason: scope.cancel(),
        connected_at=now,
        last_seen=now,
        payout_threshold_sats=threshold_sats,
        fetch_timeout=fetch_timeout,
        clock=trio.current_time,
    )
    old = registry.nodes.get(link.id)
    if old is not None:
        old.close("replaced by a new connection of the same node")
    registry.nodes[link.id] = link
    registry.membership_changed()
    log.info("stock node %s online: %d models", link.id, len(link.models))

    async def sender() -> None:
        async for frame in outgoing:
            await transport.send(json.dumps(frame))

    acking: set[str] = set()

    async def ack() -> None:
        """Answer a heartbeat with the provider's earnings (``balance_sats`` always 0: a
        positive one makes the agent ask for an ecash withdrawal this gateway does not
        offer)."""
        try:
            frame = await earnings(link.id) if earnings is not None else None
        except Exception as exc:  # the store briefly failing: a bare ack this time
            log.warning("earnings of stock node %s not read: %r", link.id, exc)
            frame = None
        finally:
            acking.clear()
        send_frame(frame or {"type": "heartbeat_ack", "status": "ok", "balance_sats": 0})

    async def pings() -> None:
        while True:
            await trio.sleep(PING_INTERVAL)
            send_frame({"type": "ping"})

    async def fetch_deadlines() -> None:
        while True:
            await trio.sleep(min(1.0, fetch_timeout / 4))
            link.forget_expired()

    try:
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                nursery.start_soon(pings)
                nursery.start_soon(fetch_deadlines)
                while True:
                    with trio.move_on_after(SILENCE) as timer:
                        raw = await transport.receive()
                    if timer.cancelled_caught:
                        link.close(f"silent for {SILENCE:g}s")
                        break
                    link.last_seen = trio.current_time()
                    try:
                        data = json.loads(raw)
                    except (ValueError, RecursionError):
                        link.close("a frame that is not JSON")
                        break
                    if not isinstance(data, dict):
                        link.close("a frame that is not an object")
                        break
                    kind = data.get("type")
                    if kind == "heartbeat":
                        if not acking:  # one read at a time, however fast it beats
                            acking.add(link.id)
                            nursery.start_soon(ack)
                    elif kind in ("accept", "reject", "proxy_chunk", "proxy_done"):
                        link.frame(data)
                    elif kind == "pong":
                        pass
                    else:
                        log.info("stock node %s sent a %r frame: ignored", link.id, str(kind)[:20])
                nursery.cancel_scope.cancel()
    finally:
        if registry.nodes.get(link.id) is link:
            del registry.nodes[link.id]
        send.close()
        for attempt in list(link.attempts.values()):
            attempt.fail_nowait(f"stock node disconnected ({link.closed_reason or 'gone'})")
        registry.membership_changed()
        log.info("stock node %s offline: %s", link.id, link.closed_reason or "connection closed")
