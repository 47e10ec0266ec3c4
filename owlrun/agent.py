"""The owlrun agent: one websocket to the gateway, jobs served from a local engine.

Invariants: every job runs in its own cancel scope, and a ``cancel`` from the gateway
(or the loss of the connection) cancels it, which closes the engine request at once;
one sender task owns the websocket's send side (jobs queue into a bounded channel, so a
slow gateway applies back-pressure instead of interleaving frames); the agent never
takes more than ``max_jobs`` jobs at once and takes none while draining.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import random
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from owlrun import __version__
from owlrun.engines import Embeddings, Engine, Finish
from owlrun.errors import EngineError, GatewayLost, RefusedError
from owlrun.identity import Identity
from owlrun.protocol import (
    HEARTBEAT_INTERVAL_RANGE,
    MAX_BATCH,
    NODE_HEADER,
    PROTOCOL_VERSION,
    QUIET_GATEWAY_PROTOCOL,
    SECRET_HEADER,
    WS_PATH,
    Cancel,
    Cancelled,
    Chunk,
    Chunks,
    Delta,
    Done,
    Drain,
    Earnings,
    Embedded,
    Hardware,
    Heartbeat,
    Hello,
    Job,
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

log = logging.getLogger("owlrun")


def websocket_url(gateway: str) -> str:
    base = gateway.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :] + WS_PATH
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :] + WS_PATH
    return base + WS_PATH


PING_AFTER_INTERVALS = 5
PING_AFTER_MAX = 45.0  # seconds: under the 60 s read timeout of common proxies (nginx)
UNACKNOWLEDGED_MIN = 5.0  # seconds: the shortest TCP_USER_TIMEOUT the agent asks for


def ping_after(interval: float) -> float:
    """How long a version-4 gateway may stay quiet before the agent pings it: five
    heartbeat intervals, but at most 45 s (a proxy in between may close a connection
    that carried nothing from the gateway for 60 s, nginx's default), and at least two
    intervals and a second. A dead path that stops acknowledging the heartbeats is
    dropped sooner by the kernel (``open_gateway_socket``'s ``unacknowledged``)."""
    return max(2 * interval, 1.0, min(PING_AFTER_INTERVALS * interval, PING_AFTER_MAX))


@contextlib.asynccontextmanager
async def open_gateway_socket(
    url: str,
    headers: list[tuple[str, str]],
    *,
    max_message_size: int,
    connect_timeout: float = 10,
    unacknowledged: float | None = None,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket whose TCP stream we own and always close.

    trio-websocket leaves the stream open when the peer closes first (its ``aclose``
    returns early on an already-closed socket), so the stream is closed here.
    ``unacknowledged``: where the system allows it (Linux's ``TCP_USER_TIMEOUT``), the
    kernel drops the connection once data sent on it has gone that many seconds without
    an acknowledgement (a dead host or path; Linux's default is about 15 minutes).
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    with trio.fail_after(connect_timeout):
        if secure:
            stream: (
                trio.SocketStream | trio.SSLStream[trio.SocketStream]
            ) = await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(host, port)
    if unacknowledged is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(unacknowledged * 1000))
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await trio_websocket.wrap_client_stream(
                    nursery,
                    stream,
                    host if parts.port is None else f"{host}:{port}",
                    resource,
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                    max_message_size=max_message_size,
                )
            dead = False
            try:
                yield ws
            except BaseException as exc:
                dead = any(isinstance(e, GatewayLost) for e in _leaves(exc))
                raise
            finally:
                if not dead:  # a close handshake over a dead path would only wait
                    with trio.move_on_after(2, shield=True):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


RECOVERABLE = (
    OSError,
    RefusedError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def hardware_summary() -> Hardware:
    memory_mb = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return Hardware(
        summary=f"{platform.system()} {platform.machine()}",
        cpu_count=os.cpu_count(),
        memory_mb=memory_mb,
        gpus=[],
    )


@attrs.define
class Totals:
    jobs: int = 0
    failed: int = 0
    cancelled: int = 0
    tokens_in: int = 0
    tokens_out: int = 0


async def _gather(
    outbox: trio.MemoryReceiveChannel[Message], first: Chunk, deadline: float
) -> tuple[dict[str, list[Delta]], Message | None, bool]:
    """The tokens queued after ``first`` until ``deadline`` (one list per job, in order),
    ended early by any other message (returned to go after them) or by the outbox
    closing (True)."""
    pending: dict[str, list[Delta]] = {first.job_id: [first.delta]}
    while True:
        following: Message | None = None
        try:
            following = outbox.receive_nowait()
        except trio.EndOfChannel:
            return pending, None, True
        except trio.WouldBlock:
            if deadline <= trio.current_time():
                return pending, None, False
            with trio.move_on_at(deadline):
                try:
                    following = await outbox.receive()
                except trio.EndOfChannel:
                    return pending, None, True
            if following is None:
                return pending, None, False
        if not isinstance(following, Chunk):
            return pending, following, False
        pending.setdefault(following.job_id, []).append(following.delta)


@attrs.define(eq=False)
class Agent:
    # One gateway URL, or several separated by commas (replicas): the agent stays with
    # the one it is connected to and moves to the next when that connection is lost.
    gateway: str
    identity: Identity
    engine: Engine
    max_jobs: int = 1
    allowed_models: tuple[str, ...] = ()
    name: str = ""
    payout_address: str = ""
    payout_threshold_sats: int | None = None
    model_refresh: float = 30.0
    summary_interval: float = 300.0
    drain_timeout: float = 30.0
    max_message_bytes: int = 16 * 1024 * 1024
    heartbeat_interval: float = 10.0
    # Tokens that follow a chunk frame within this many seconds join the next frame.
    batch_window: float = 0.005
    models: list[ModelInfo] = attrs.Factory(list)
    earnings: Earnings | None = None
    totals: Totals = attrs.Factory(Totals)
    connected: bool = False
    sessions: int = 0
    draining: bool = False
    _jobs: dict[str, trio.CancelScope] = attrs.Factory(dict)
    _outbox: trio.MemorySendChannel[Message] | None = None
    _idle: trio.Event = attrs.Factory(trio.Event)
    _session_scope: trio.CancelScope | None = None
    _welcomed: bool = False
    protocol_version: int = PROTOCOL_VERSION  # as negotiated with the gateway
    # Jobs that hold a slot: a job frees it the moment its last frame is queued, which
    # is when the gateway frees it too (the engine response may take longer to close).
    _busy: set[str] = attrs.Factory(set)
    # Cancelled jobs to acknowledge (protocol 2) when their task ends.
    _acks: set[str] = attrs.Factory(set)
    _flushed: trio.Event = attrs.Factory(trio.Event)
    _current: int = 0  # index of the gateway in use
    _heard: float = 0.0  # when the gateway last said anything (trio's clock)

    @property
    def gateways(self) -> list[str]:
        return [g.strip() for g in self.gateway.split(",") if g.strip()]

    @property
    def current_gateway(self) -> str:
        urls = self.gateways
        return urls[self._current % len(urls)]

    def statistics(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "in_flight": len(self._jobs),
            "models": [m.name for m in self.models],
            **attrs.asdict(self.totals),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect with exponential backoff and jitter; never returns
        unless refused for good (``RefusedError``) or cancelled."""
        delay = 0.5
        started = False
        while True:
            self._welcomed = False
            try:
                await self._session(task_status if not started else trio.TASK_STATUS_IGNORED)
            except BaseException as exc:
                leaves = _leaves(exc)
                if not all(isinstance(e, RECOVERABLE) for e in leaves):
                    raise  # cancellation or a bug: never swallowed, never replaced
                refused = [e for e in leaves if isinstance(e, RefusedError)]
                if refused and not all(r.retryable for r in refused):
                    raise refused[0] from None
                log.warning(
                    "connection to the gateway lost: %s", leaves[0] or type(leaves[0]).__name__
                )
            finally:
                self.connected = False
            if self._welcomed:
                started = True
                delay = 0.5
            self._current += 1  # the next gateway (the same one when there is one)
            if len(self.gateways) > 1 and self._current % len(self.gateways):
                sleep = random.uniform(0.05, 0.2)  # another replica: try it at once
            else:
                sleep = random.uniform(delay / 2, delay)
                delay = min(delay * 2, 30.0)
            log.info("reconnecting to %s in %.1fs", self.current_gateway, sleep)
            await trio.sleep(sleep)

    async def refresh_models(self) -> bool:
        """Ask the engine what it serves now; True when that changed."""
        try:
            found = await self.engine.list_models()
        except (httpx.HTTPError, EngineError, ValueError) as exc:
            log.warning("cannot list the engine's models at %s: %s", self.engine.url, exc)
            return False
        if self.allowed_models:
            found = [m for m in found if m.name in self.allowed_models]
        found.sort(key=lambda m: m.name)
        if found == self.models:
            return False
        self.models = found
        log.info("serving models: %s", ", ".join(m.name for m in found) or "(none)")
        return True

    async def _session(self, task_status: trio.TaskStatus[None]) -> None:
        await self.refresh_models()
        headers = [
            (NODE_HEADER, self.identity.node_id),
            (SECRET_HEADER, self.identity.secret),
        ]
        url = websocket_url(self.current_gateway)
        async with open_gateway_socket(
            url,
            headers,
            max_message_size=self.max_message_bytes,
            # Three heartbeats (as the gateway last set them) unacknowledged: a dead path;
            # never under 5 s, so that a few lost packets are sent again first.
            unacknowledged=max(3 * self.heartbeat_interval, UNACKNOWLEDGED_MIN),
        ) as ws:
            hello = Hello(
                node_id=self.identity.node_id,
                agent_version=__version__,
                protocol_version=PROTOCOL_VERSION,
                models=list(self.models),
                max_concurrency=self.max_jobs,
                hardware=hardware_summary(),
                name=self.name,
                payout_address=self.payout_address,
                payout_threshold_sats=self.payout_threshold_sats,
            )
            await ws.send_message(encode(hello))
            with trio.fail_after(15):
                reply = decode(await ws.get_message())
            if isinstance(reply, Refused):
                raise RefusedError(reply.reason, reply.retryable)
            if not isinstance(reply, Welcome):
                raise ProtocolError(f"expected welcome, got {reply.type}")
            low, high = HEARTBEAT_INTERVAL_RANGE
            if not low <= reply.heartbeat_interval <= high:
                raise ProtocolError(
                    f"the gateway's heartbeat interval {reply.heartbeat_interval:g} s"
                    f" is outside {low:g} to {high:g} s"
                )
            self.heartbeat_interval = reply.heartbeat_interval
            self.protocol_version = min(reply.protocol_version, PROTOCOL_VERSION)
            self._heard = trio.current_time()
            self.connected = True
            self._welcomed = True
            self.sessions += 1
            log.info(
                "connected to %s as %s (payout threshold %d sats)",
                self.current_gateway,
                reply.node_id,
                reply.payout_threshold_sats,
            )
            send, receive = trio.open_memory_channel[Message](256)
            self._outbox = send
            self._flushed = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    self._session_scope = nursery.cancel_scope
                    nursery.start_soon(self._sender, ws, receive)
                    nursery.start_soon(self._heartbeats, ws)
                    nursery.start_soon(self._watch_models)
                    nursery.start_soon(self._summaries)
                    task_status.started()
                    if self.draining:
                        await send.send(Drain(reason="agent stopping"))
                    await self._receiver(ws, nursery)
            finally:
                self._outbox = None
                self._session_scope = None

    async def _sender(
        self, ws: trio_websocket.WebSocketConnection, outbox: trio.MemoryReceiveChannel[Message]
    ) -> None:
        """Sends the outbox in order. Tokens are coalesced: a chunk leaves at once when no
        chunk frame left in the last ``batch_window`` seconds; otherwise it waits for the
        rest of that window (or until any other message, such as the job's ``done``,
        arrives), and every token queued meanwhile leaves with it, one ``chunks`` frame
        per job. A token is never held longer than the window, so an engine slower than
        one token per window sees no batching at all, and a fast one sends a few frames
        per answer instead of one per token. Order per job is kept: any other message
        leaves after the chunks queued before it."""
        last_chunk_frame = -math.inf
        closed = False
        while not closed:
            try:
                message = await outbox.receive()
            except trio.EndOfChannel:
                break
            if not isinstance(message, Chunk):
                await ws.send_message(encode(message))
                continue
            deadline = last_chunk_frame + self.batch_window
            if deadline <= trio.current_time():
                # One scheduling turn: tokens already in our socket buffer join the frame.
                await trio.lowlevel.checkpoint()
            pending, after, closed = await _gather(outbox, message, deadline)
            for job_id, deltas in pending.items():
                for start in range(0, len(deltas), MAX_BATCH):
                    part = deltas[start : start + MAX_BATCH]
                    frame: Message = (
                        Chunk(job_id=job_id, delta=part[0])
                        if len(part) == 1
                        else Chunks(job_id=job_id, deltas=part)
                    )
                    await ws.send_message(encode(frame))
            last_chunk_frame = trio.current_time()
            if after is not None:
                await ws.send_message(encode(after))
        self._flushed.set()  # the outbox was closed (drain) and every frame is sent

    async def _send(self, message: Message) -> None:
        if self._outbox is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._outbox.send(message)

    async def _heartbeats(self, ws: trio_websocket.WebSocketConnection) -> None:
        """A heartbeat every interval. Version 4: the gateway answers none, so when it
        has said nothing for ``ping_after`` seconds, the heartbeat is followed at once
        by a websocket ping (its server answers it, below the application; leaving
        together, both usually reach the gateway in one read), and no pong within one
        more interval is a lost connection (``GatewayLost``)."""
        quiet = ping_after(self.heartbeat_interval)
        wait = max(self.heartbeat_interval, 1.0)  # never a hair-trigger on a busy loop
        async with trio.open_nursery() as nursery:
            pinging = False

            async def ping() -> None:
                nonlocal pinging
                with trio.move_on_after(wait):
                    await ws.ping()
                    self._heard = trio.current_time()
                    pinging = False
                    return
                raise GatewayLost(f"the gateway did not answer a ping within {wait:g}s")

            while True:
                await trio.sleep(self.heartbeat_interval)
                await self._send(Heartbeat(in_flight=len(self._jobs)))
                if (
                    self.protocol_version >= QUIET_GATEWAY_PROTOCOL
                    and not pinging
                    and trio.current_time() - self._heard >= quiet
                ):
                    pinging = True
                    nursery.start_soon(ping)

    async def _watch_models(self) -> None:
        while True:
            await trio.sleep(self.model_refresh)
            if await self.refresh_models():
                await self._send(ModelsUpdate(models=list(self.models)))

    async def _summaries(self) -> None:
        while True:
            await trio.sleep(self.summary_interval)
            t = self.totals
            money = ""
            if self.earnings is not None:
                e = self.earnings
                money = (
                    f"; earned {e.earned_msat // 1000} sats, held {e.held_msat // 1000},"
                    f" paid {e.paid_msat // 1000}, pending {e.pending_msat // 1000}"
                )
            log.info(
                "summary: %d jobs (%d failed, %d cancelled), %d tokens in, %d out%s",
                t.jobs,
                t.failed,
                t.cancelled,
                t.tokens_in,
                t.tokens_out,
                money,
            )

    async def _receiver(
        self, ws: trio_websocket.WebSocketConnection, nursery: trio.Nursery
    ) -> None:
        silence = max(3 * self.heartbeat_interval, 1.0)
        quiet_gateway = self.protocol_version >= QUIET_GATEWAY_PROTOCOL
        while True:
            if quiet_gateway:  # its silence is the heartbeats' business (their pings)
                frame = await ws.get_message()
                self._heard = trio.current_time()
            else:  # an older gateway answers every heartbeat
                with trio.move_on_after(silence) as waited:
                    frame = await ws.get_message()
                if waited.cancelled_caught:
                    raise GatewayLost(f"the gateway said nothing for {silence:g}s")
            message = decode(frame)
            if isinstance(message, Job):
                if self.draining or len(self._busy) >= self.max_jobs:
                    await self._send(JobError(message.job_id, "node is busy or draining", True))
                elif message.model not in {m.name for m in self.models}:
                    await self._send(JobError(message.job_id, "model not served here", True))
                elif message.job_id in self._jobs:
                    continue
                else:
                    scope = trio.CancelScope()
                    self._jobs[message.job_id] = scope
                    self._busy.add(message.job_id)
                    self._idle = trio.Event() if self._idle.is_set() else self._idle
                    nursery.start_soon(self._run_job, message, scope)
            elif isinstance(message, Cancel):
                running = self._jobs.get(message.job_id)
                if running is not None:
                    running.cancel()
                    if self.protocol_version >= 2:
                        # Said once the job's last frame is queued (see _run_job).
                        self._acks.add(message.job_id)
            elif isinstance(message, Earnings):
                self.earnings = message
                log.info(
                    "earnings: %d sats earned, %d held, %d payable, %d paid, %d pending",
                    message.earned_msat // 1000,
                    message.held_msat // 1000,
                    message.payable_msat // 1000,
                    message.paid_msat // 1000,
                    message.pending_msat // 1000,
                )
            elif isinstance(message, Drain):
                log.info("the gateway is draining: %s", message.reason or "no reason given")
            elif isinstance(message, Heartbeat):
                pass
            else:
                raise ProtocolError(f"unexpected {message.type} message from the gateway")

    async def _run_job(self, job: Job, scope: trio.CancelScope) -> None:
        started = time.monotonic()
        usage_in = usage_out = 0
        outcome = "cancelled"
        try:
            with scope:
                try:
                    async with contextlib.aclosing(self.engine.serve(job)) as events:  # type: ignore[type-var]
                        async for event in events:
                            if isinstance(event, Embeddings):
                                usage_in = (event.usage and event.usage.prompt_tokens) or 0
                                self._busy.discard(job.job_id)
                                await self._send(Embedded(job.job_id, event.vectors, event.usage))
                                outcome = "done"
                            elif isinstance(event, Finish):
                                usage_in = (event.usage and event.usage.prompt_tokens) or 0
                                usage_out = (event.usage and event.usage.completion_tokens) or 0
                                self._busy.discard(job.job_id)
                                await self._send(Done(job.job_id, event.finish_reason, event.usage))
                                outcome = "done"
                            else:
                                if self.protocol_version < 2 and (event.reasoning or event.refusal):
                                    # A version-1 gateway knows only content and tool calls.
                                    event = Delta(
                                        content=event.content, tool_calls=event.tool_calls
                                    )
                                    if event.is_empty():
                                        continue
                                await self._send(Chunk(job.job_id, event))
                except EngineError as exc:
                    outcome = "failed"
                    self._busy.discard(job.job_id)
                    await self._send(JobError(job.job_id, exc.message, exc.retryable))
                except httpx.HTTPError as exc:
                    outcome = "failed"
                    log.warning("engine request failed: %s", type(exc).__name__)
                    self._busy.discard(job.job_id)
                    await self._send(JobError(job.job_id, "engine unreachable", True))
        finally:
            self._busy.discard(job.job_id)
            del self._jobs[job.job_id]
            if job.job_id in self._acks:
                self._acks.discard(job.job_id)
                if self._outbox is not None:
                    with contextlib.suppress(
                        trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
                    ):
                        self._outbox.send_nowait(Cancelled(job.job_id))
            if not self._jobs:
                self._idle.set()
            t = self.totals
            if outcome == "done":
                t.jobs += 1
                t.tokens_in += usage_in
                t.tokens_out += usage_out
            elif outcome == "failed":
                t.failed += 1
            else:
                t.cancelled += 1
            log.info(
                "job %s %s: model %s, %d tokens in, %d out, %.0f ms",
                job.job_id,
                outcome,
                job.model,
                usage_in,
                usage_out,
                (time.monotonic() - started) * 1000,
            )

    async def drain(self) -> None:
        """Stop taking jobs, let in-flight ones finish (bounded), then end the session."""
        self.draining = True
        await self._send(Drain(reason="agent stopping"))
        with trio.move_on_after(self.drain_timeout):
            if self._jobs:
                log.info(
                    "draining %d in-flight jobs (up to %gs)", len(self._jobs), self.drain_timeout
                )
                await self._idle.wait()
            # Let the last frames (the jobs' done messages) reach the gateway.
            if self._outbox is not None:
                self._outbox.close()
                await self._flushed.wait()
        for scope in list(self._jobs.values()):
            scope.cancel()
