"""The scheduler: picks a node, runs the job in one cancel scope, fails over, settles once.

Invariants:
- Admission (model known, a node with a free slot, or a bounded wait for one) is
  decided in ``submit`` / ``run_here``, before any response starts, so 404/503 are real
  statuses.
- Each job runs as one task, inside one cancel scope: a task of the scheduler's own
  nursery (``submit``), or the caller's (``run_here``, for a view that needs the whole
  answer before it responds: one task and one channel fewer). Whatever ends it (done,
  client gone, node gone, timeout, shutdown), the completion hook runs exactly once,
  shielded, with what the job observed.
- A failure before the first token is retried on another node (bounded attempts);
  after the first token it is final.
"""

from __future__ import annotations

import contextlib
import logging
import math
import string
from collections.abc import Callable

import attrs
import trio

from owlrun.protocol import (
    EMBEDDING_PROTOCOL,
    MIN_PROTOCOL_VERSION,
    Chunk,
    Chunks,
    Done,
    Embedded,
    Job,
    JobError,
)
from routecat.clock import Clock
from routecat.config import Config
from routecat.errors import RequestError, ServiceUnavailable, UpstreamError
from routecat.metrics import Metrics
from routecat.network.errors import NodeFailed
from routecat.network.jobs import (
    Bill,
    CompletionHook,
    Event,
    Failure,
    Final,
    JobResult,
    JobSpec,
    Outcome,
)
from routecat.network.link import Attempt, NodeLink
from routecat.network.measure import delta_bytes, vector_problem
from routecat.network.registry import Registry

log = logging.getLogger("routecat.scheduler")

_ALPHABET = string.ascii_letters + string.digits
SETTLE_TIMEOUT = 30.0
CLIENT_STALL_TIMEOUT = 300.0


@attrs.define(eq=False)
class JobHandle:
    """The view's side of a job: its events and a way to cancel. A job started with
    ``submit`` runs in the scheduler's task and sends its events over ``events``; one
    run with ``run_here`` runs in the caller's task and hands them to ``sink``."""

    spec: JobSpec
    events: trio.MemoryReceiveChannel[Event]
    _send: trio.MemorySendChannel[Event]
    sink: Callable[[Event], None] | None = None
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    cancel_reason: Outcome | None = None
    finished: trio.Event = attrs.Factory(trio.Event)
    result: JobResult | None = None

    def cancel_nowait(self, reason: Outcome) -> None:
        """Stop the job (client gone). A no-op once it has finished."""
        if self.cancel_reason is None and not self.finished.is_set():
            self.cancel_reason = reason
            self.scope.cancel()
        self.events.close()


@attrs.define
class _Progress:
    node: NodeLink | None = None
    attempt: Attempt | None = None
    attempts: int = 0
    failed_nodes: list[str] = attrs.Factory(list)
    chunks: int = 0
    bytes: int = 0
    first_token_at: float | None = None
    done: Done | None = None
    outcome: Outcome | None = None
    dispatched: bool = False
    tool_calls: set[int] = attrs.Factory(set)
    vectors: tuple[str, ...] = ()


@attrs.define(eq=False)
class Scheduler:
    config: Config
    registry: Registry
    metrics: Metrics
    on_complete: CompletionHook
    clock: Clock
    jobs: dict[str, JobHandle] = attrs.Factory(dict)
    accepting: bool = True
    waiting: int = 0
    completed: int = 0
    _nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def statistics(self) -> dict[str, int]:
        return {"in_flight": len(self.jobs), "waiting": self.waiting, "completed": self.completed}

    async def drain(self, grace: float) -> None:
        """Take no new jobs; wait up to ``grace`` seconds for in-flight ones."""
        self.accepting = False
        self.registry.changed()
        with trio.move_on_after(grace):
            while self.jobs:
                await next(iter(self.jobs.values())).finished.wait()

    def cut_all(self) -> None:
        """Shutdown after the drain time: cut every job still running (outcome shutdown)."""
        for handle in list(self.jobs.values()):
            if handle.cancel_reason is None and not handle.finished.is_set():
                handle.cancel_reason = "shutdown"
                handle.scope.cancel()

    # -- admission --

    def check_model(self, model: str) -> None:
        from routecat.errors import NotFound

        if not self.registry.is_known(model):
            raise NotFound(
                f"model '{model}' does not exist on this network; see GET /v1/models",
                code="model_not_found",
                param="model",
            )

    def _try_slot(self, spec: JobSpec, exclude: list[str]) -> Attempt | None:
        """A free slot now, None if all are busy; 503 if no eligible node is online."""
        need = EMBEDDING_PROTOCOL if spec.kind == "embedding" else MIN_PROTOCOL_VERSION
        node = self.registry.pick(spec.model, exclude, min_protocol=need)
        if node is not None:
            return node.open_attempt(spec.job_id)
        eligible = [
            n
            for n in self.registry.serving(spec.model)
            if n.id not in exclude and n.protocol_version >= need
        ]
        if not eligible:
            raise ServiceUnavailable(
                f"no node serving '{spec.model}' is online right now", retry_after=10
            )
        now = self.clock.monotonic()
        if all(n.cooldown_until > now for n in eligible):
            # Waiting cannot help before a cooldown ends: say so at once.
            wait = min(n.cooldown_until for n in eligible) - now
            raise ServiceUnavailable(
                f"every node serving '{spec.model}' is cooling down after failures;"
                f" retry in {math.ceil(wait)}s",
                retry_after=max(1, math.ceil(wait)),
            )
        return None

    async def _acquire(self, spec: JobSpec, exclude: list[str], deadline: float) -> Attempt:
        """A slot on the best node for ``spec.model``, waiting (bounded) when all are busy."""
        if not self.accepting:
            raise ServiceUnavailable("the gateway is shutting down", retry_after=5)
        attempt = self._try_slot(spec, exclude)
        if attempt is not None:
            return attempt
        if self.waiting >= self.config.queue_max:
            raise ServiceUnavailable("every node is busy and the wait queue is full", retry_after=5)
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            with trio.move_on_at(deadline):
                while True:
                    await self.registry.wait_changed()
                    if not self.accepting:
                        break
                    attempt = self._try_slot(spec, exclude)
                    if attempt is not None:
                        return attempt
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        raise ServiceUnavailable(
            f"every node serving '{spec.model}' stayed busy for {self.config.queue_timeout:g}s",
            retry_after=max(1, math.ceil(self.config.queue_timeout / 6)),
        )

    async def submit(self, spec: JobSpec) -> JobHandle:
        """Admit the job (or raise 404/503) and start it in the scheduler's task; its
        events arrive on ``handle.events``. The caller owns the handle."""
        assert self._nursery is not None, "scheduler not running"
        handle, attempt = await self._admit(spec, None)
        self._nursery.start_soon(self._run, handle, attempt)
        return handle

    async def run_here(
        self,
        spec: JobSpec,
        sink: Callable[[Event], None],
        started: Callable[[JobHandle], None],
    ) -> JobHandle:
        """Admit the job (or raise 404/503), then run it to its end in this task,
        handing each event to ``sink`` (which must not block) and the handle to
        ``started`` before it runs. Settled like any job, whatever ends it: being
        cancelled ends it with the handle's ``cancel_reason`` (``shutdown`` if none)."""
        handle, attempt = await self._admit(spec, sink)
        try:
            started(handle)
        except BaseException:
            # Never a job without its caller: nothing was dispatched, so the job is
            # forgotten and its node slot freed (the caller gives the reservation back).
            del attempt.node.attempts[attempt.job_id]
            attempt.send.close()
            del self.jobs[spec.job_id]
            self.metrics.jobs_in_flight.set(len(self.jobs))
            self.registry.changed()
            handle.finished.set()
            raise
        await self._run(handle, attempt)
        return handle

    async def _admit(
        self, spec: JobSpec, sink: Callable[[Event], None] | None
    ) -> tuple[JobHandle, Attempt]:
        self.check_model(spec.model)
        attempt = await self._acquire(spec, [], self.clock.monotonic() + self.config.queue_timeout)
        send, receive = trio.open_memory_channel[Event](0 if sink else 64)
        handle = JobHandle(spec, receive, send, sink)
        self.jobs[spec.job_id] = handle
        self.metrics.jobs_in_flight.set(len(self.jobs))
        return handle, attempt

    # -- the job --

    async def _run(self, handle: JobHandle, attempt: Attempt) -> None:
        spec = handle.spec
        progress = _Progress()
        started_wall = self.clock.wall()
        started = self.clock.monotonic()
        try:
            with handle.scope:
                await self._attempts(handle, attempt, progress, started)
        finally:
            with trio.CancelScope(shield=True):
                self._release(progress)
                outcome = progress.outcome or self._ending(handle)
                result = JobResult(
                    spec=spec,
                    outcome=outcome,
                    node_id=progress.node.id if progress.node else None,
                    finish_reason=progress.done.finish_reason if progress.done else None,
                    reported=progress.done.usage if progress.done else None,
                    delivered_chunks=progress.chunks,
                    delivered_bytes=progress.bytes,
                    attempts=progress.attempts,
                    failed_nodes=tuple(progress.failed_nodes),
                    started_at=started_wall,
                    duration=self.clock.monotonic() - started,
                    ttft=None
                    if progress.first_token_at is None
                    else progress.first_token_at - started,
                    dispatched=progress.dispatched,
                    tool_calls=len(progress.tool_calls),
                    violation=progress.done.violation if progress.done else "",
                )
                handle.result = result
                bill: Bill | None = None
                with trio.move_on_after(SETTLE_TIMEOUT) as settle_timer:
                    try:
                        bill = await self.on_complete(result)
                    except Exception as exc:  # a bug in the hook must not stop the scheduler
                        log.error("settling job %s failed", spec.job_id, exc_info=exc)
                if settle_timer.cancelled_caught:
                    log.error("settling job %s took over %gs", spec.job_id, SETTLE_TIMEOUT)
                self.completed += 1
                self.metrics.jobs.labels(spec.model, outcome).inc()
                if outcome == "done" and bill is not None and progress.done is not None:
                    final = Final(progress.done.finish_reason, bill, progress.vectors)
                    if handle.sink is not None:
                        handle.sink(final)
                    else:
                        with (
                            trio.move_on_after(CLIENT_STALL_TIMEOUT),
                            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                        ):
                            await handle._send.send(final)
                handle._send.close()
                del self.jobs[spec.job_id]
                self.metrics.jobs_in_flight.set(len(self.jobs))
                handle.finished.set()

    def _ending(self, handle: JobHandle) -> Outcome:
        if handle.cancel_reason is not None:
            return handle.cancel_reason
        return "shutdown"

    def _release(self, progress: _Progress) -> None:
        """Free the node slot of the current attempt, cancelling it on the node if unfinished."""
        attempt = progress.attempt
        if attempt is None:
            return
        node = attempt.node
        if node.attempts.get(attempt.job_id) is attempt:
            del node.attempts[attempt.job_id]
            if progress.done is None and not attempt.finished:
                node.cancel_job(attempt.job_id, "cancelled by the gateway")
        attempt.send.close()
        progress.attempt = None
        self.registry.changed()

    async def _attempts(
        self, handle: JobHandle, attempt: Attempt, progress: _Progress, started: float
    ) -> None:
        spec = handle.spec
        deadline = started + self.config.queue_timeout

        def client_not_reading() -> None:
            handle.cancel_reason = handle.cancel_reason or "client_gone"
            handle.scope.cancel()

        while True:
            progress.attempt = attempt
            progress.node = attempt.node
            progress.attempts += 1
            attempt.on_overflow = client_not_reading
            job = Job(job_id=spec.job_id, kind=spec.kind, model=spec.model, request=spec.request)
            try:
                if not attempt.node.send_nowait(job):
                    raise NodeFailed("node went away", retryable=True)
                progress.dispatched = True
                await self._pump(handle, attempt, progress)
                self._succeeded(attempt.node, progress, started)
                progress.outcome = "done"
                return
            except NodeFailed as failure:
                node = attempt.node
                if not progress.chunks and failure.outcome != "client_gone":
                    progress.dispatched = False  # refused or failed: nothing was served
                self._release(progress)
                if failure.blame:
                    self._cool_down(node, failure.reason)
                progress.failed_nodes.append(node.id)
                log.warning("job %s failed on node %s: %s", spec.job_id, node.id, failure.reason)
                if (
                    progress.chunks
                    or not failure.retryable
                    or progress.attempts >= self.config.max_attempts
                ):
                    progress.outcome = failure.outcome
                    await self._fail(handle, progress, failure)
                    return
                try:
                    attempt = await self._acquire(
                        spec, progress.failed_nodes, max(deadline, self.clock.monotonic() + 5)
                    )
                except ServiceUnavailable as exc:
                    progress.outcome = "no_capacity"
                    await self._emit(handle, Failure(exc))
                    return

    async def _fail(self, handle: JobHandle, progress: _Progress, failure: NodeFailed) -> None:
        if progress.chunks:
            error: RequestError = UpstreamError(
                f"the provider node failed after output started: {failure.reason}"
            )
        elif failure.retryable:
            error = ServiceUnavailable(
                f"no node could serve the request: {failure.reason}", retry_after=5
            )
        else:
            error = UpstreamError(
                f"the provider node could not serve the request: {failure.reason}"
            )
        await self._emit(handle, Failure(error))

    async def _emit(self, handle: JobHandle, event: Event) -> None:
        """Hand an event to the view and let it run."""
        if await self._offer(handle, event) and handle.sink is None:
            await trio.lowlevel.checkpoint()

    async def _offer(self, handle: JobHandle, event: Event) -> bool:
        """Hand an event to the view without letting it run when there is room (so the
        events of one frame leave in one write); False once the view is gone. A view gone
        or stalled for minutes means the client is gone."""
        if handle.sink is not None:
            handle.sink(event)
            return True
        try:
            handle._send.send_nowait(event)  # the common case: room in the buffer
            return True
        except trio.WouldBlock:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            handle.cancel_reason = handle.cancel_reason or "client_gone"
            handle.scope.cancel()
            return False
        await self._emit_waiting(handle, event)
        return handle.cancel_reason is None

    async def _emit_waiting(self, handle: JobHandle, event: Event) -> None:
        """The view's buffer is full: wait for room, at most ``CLIENT_STALL_TIMEOUT``."""
        with trio.move_on_after(CLIENT_STALL_TIMEOUT) as timer:
            try:
                await handle._send.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                handle.cancel_reason = handle.cancel_reason or "client_gone"
                handle.scope.cancel()
        if timer.cancelled_caught:
            handle.cancel_reason = handle.cancel_reason or "client_gone"
            handle.scope.cancel()

    async def _pump(self, handle: JobHandle, attempt: Attempt, progress: _Progress) -> None:
        first = progress.chunks == 0
        while True:
            timeout = self.config.first_token_timeout if first else self.config.inter_token_timeout
            with trio.move_on_after(timeout) as timer:
                try:
                    frame = await attempt.inbox.receive()
                except trio.EndOfChannel:
                    if attempt.client_slow:
                        handle.cancel_reason = handle.cancel_reason or "client_gone"
                        raise NodeFailed(
                            attempt.failure or "client not reading",
                            retryable=False,
                            blame=False,
                            outcome="client_gone",
                        ) from None
                    raise NodeFailed(
                        attempt.failure or "node disconnected", retryable=True
                    ) from None
            if timer.cancelled_caught:
                which = "first-token" if first else "inter-token"
                raise NodeFailed(
                    f"{which} timeout ({timeout:g}s)", retryable=True, outcome="timeout"
                )
            embedding = handle.spec.kind == "embedding"
            if embedding != isinstance(frame, Embedded) and not isinstance(frame, JobError):
                # Text for an embedding job, or vectors for a text job: not this job's answer.
                raise NodeFailed(f"a {frame.type} frame for a {handle.spec.kind} job", True)
            if isinstance(frame, Chunk | Chunks):
                handed = False
                for delta in frame.deltas if isinstance(frame, Chunks) else (frame.delta,):
                    if delta.is_empty():
                        continue
                    if first:
                        progress.first_token_at = self.clock.monotonic()
                        first = False
                    progress.chunks += 1
                    progress.bytes += delta_bytes(delta)
                    for call in delta.tool_calls or ():
                        if (call.get("function") or {}).get("name"):
                            progress.tool_calls.add(call["index"])
                    handed = await self._offer(handle, delta)
                    if not handed:
                        break  # the client is gone: its scope is cancelled
                if handed and handle.sink is None:
                    await trio.lowlevel.checkpoint()  # the view writes the frame's events
            elif isinstance(frame, Done):
                progress.done = frame
                return
            elif isinstance(frame, Embedded):
                # An embedding's whole result: the job is done, its usage reported here.
                problem = vector_problem(frame.vectors, len(handle.spec.request.get("input", ())))
                if problem is not None:
                    raise NodeFailed(f"malformed embeddings: {problem}", retryable=True)
                progress.vectors = tuple(frame.vectors)
                progress.done = Done(frame.job_id, "stop", frame.usage)
                return
            elif isinstance(frame, JobError):
                raise NodeFailed(
                    f"node reported: {frame.message[:200]}",
                    retryable=frame.retryable,
                    blame=not frame.retryable,
                )

    def _succeeded(self, node: NodeLink, progress: _Progress, started: float) -> None:
        now = self.clock.monotonic()
        ttft = None if progress.first_token_at is None else progress.first_token_at - started
        tokens = (
            progress.done.usage.completion_tokens if progress.done and progress.done.usage else None
        )
        generating = now - progress.first_token_at if progress.first_token_at else 0.0
        node.succeeded(ttft, tokens or progress.chunks, generating)

    def _cool_down(self, node: NodeLink, reason: str) -> None:
        pause = node.failed(self.clock.monotonic())
        log.info("node %s cooling down %.0fs after: %s", node.id, pause, reason)
