"""The scheduler in virtual time: fake nodes over memory channels, ``autojump_clock``
(a test function must take it as an argument for pytest-trio to run under it).

Every timeout (first token, inter-token, queue, cooldown) is asserted to the virtual
second, which the integration tier cannot do on real time."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from owlrun.protocol import Chunk, Delta, Done, Job, Usage
from routecat.config import Config
from routecat.errors import ServiceUnavailable, UpstreamError
from routecat.network.jobs import Bill, Failure, Final, JobResult, JobSpec
from routecat.network.registry import Registry
from routecat.network.scheduler import Scheduler
from tests.unit.network.fakes import FakeNode, add_node, registry

CONFIG = Config(
    first_token_timeout=40.0, inter_token_timeout=7.0, queue_timeout=30.0, max_attempts=3
)


class Hook:
    """The completion hook: records each result once."""

    def __init__(self) -> None:
        self.results: list[JobResult] = []

    async def __call__(self, result: JobResult) -> Bill:
        self.results.append(result)
        return Bill(1, 2, 3)


def spec(job_id: str = "chatcmpl-1", model: str = "m") -> JobSpec:
    return JobSpec(
        job_id=job_id,
        kind="chat",
        model=model,
        request={"model": model, "messages": [{"role": "user", "content": "hi"}]},
        stream=True,
        key_id=1,
        max_tokens=16,
        prompt_bound=100,
    )


@pytest.fixture
async def net() -> AsyncIterator[tuple[Scheduler, Registry, Hook]]:
    reg = registry()
    hook = Hook()
    scheduler = Scheduler(CONFIG, reg, reg.metrics, hook, reg.clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.run)
        yield scheduler, reg, hook
        nursery.cancel_scope.cancel()


async def next_job(node: FakeNode) -> Job:
    message = await node.outbox.receive()
    assert isinstance(message, Job), message
    return message


async def test_first_token_timeout_fails_over_to_another_node(net, autojump_clock) -> None:
    scheduler, reg, hook = net
    slow = add_node(reg, "slow")
    started = trio.current_time()
    handle = await scheduler.submit(spec())
    assert (await next_job(slow)).job_id == "chatcmpl-1"
    fast = add_node(reg, "fast")
    job = await next_job(fast)  # after exactly the first-token timeout
    assert trio.current_time() - started == pytest.approx(CONFIG.first_token_timeout)
    fast.link.attempts[job.job_id].deliver_nowait(
        Chunk(job_id=job.job_id, delta=Delta(content="x"))
    )
    usage = Usage(prompt_tokens=5, completion_tokens=1)
    fast.link.attempts[job.job_id].deliver_nowait(
        Done(job_id=job.job_id, finish_reason="stop", usage=usage)
    )
    events = [event async for event in handle.events]
    assert events == [Delta(content="x"), Final("stop", Bill(1, 2, 3))]
    (result,) = hook.results
    assert result.outcome == "done" and result.node_id == "fast"
    assert result.failed_nodes == ("slow",) and result.attempts == 2
    # The slow node was told to stop, and is cooling down for 5 s.
    cancel = await slow.outbox.receive()
    assert cancel.type == "cancel" and cancel.job_id == "chatcmpl-1"
    assert slow.link.cooldown_until == pytest.approx(started + CONFIG.first_token_timeout + 5)


async def test_inter_token_timeout_after_output_is_final(net, autojump_clock) -> None:
    scheduler, reg, hook = net
    node = add_node(reg, "a")
    add_node(reg, "b")  # never tried: output had started
    handle = await scheduler.submit(spec())
    job = await next_job(node)
    node.link.attempts[job.job_id].deliver_nowait(
        Chunk(job_id=job.job_id, delta=Delta(content="x"))
    )
    assert await handle.events.receive() == Delta(content="x")
    began = trio.current_time()
    failure = await handle.events.receive()
    assert trio.current_time() - began == pytest.approx(CONFIG.inter_token_timeout)
    assert isinstance(failure, Failure) and isinstance(failure.error, UpstreamError)
    assert "inter-token timeout (7s)" in failure.error.message
    await handle.finished.wait()
    (result,) = hook.results
    assert result.outcome == "timeout" and result.delivered_chunks == 1 and result.attempts == 1


async def test_a_full_network_queues_then_refuses_at_the_queue_timeout(net, autojump_clock) -> None:
    scheduler, reg, _ = net
    node = add_node(reg, "a")
    await scheduler.submit(spec("chatcmpl-1"))
    await next_job(node)
    began = trio.current_time()
    with pytest.raises(ServiceUnavailable, match="stayed busy for 30s") as caught:
        await scheduler.submit(spec("chatcmpl-2"))
    assert trio.current_time() - began == pytest.approx(CONFIG.queue_timeout)
    assert caught.value.retry_after == 5
    assert scheduler.waiting == 0


async def test_a_queued_job_gets_the_slot_the_moment_it_frees(net, autojump_clock) -> None:
    scheduler, reg, _ = net
    node = add_node(reg, "a")
    first = await scheduler.submit(spec("chatcmpl-1"))
    job = await next_job(node)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduler.submit, spec("chatcmpl-2"))
        await trio.sleep(12)
        assert scheduler.waiting == 1
        node.link.attempts[job.job_id].deliver_nowait(Done(job_id=job.job_id, finish_reason="stop"))
        await first.finished.wait()
        second = await next_job(node)
    assert second.job_id == "chatcmpl-2" and trio.current_time() == pytest.approx(12, abs=0.01)


async def test_cooldown_refuses_at_once_then_ends(net, autojump_clock) -> None:
    scheduler, reg, _ = net
    node = add_node(reg, "a")
    node.link.failed(trio.current_time())  # first failure: 5 s
    node.link.failed(trio.current_time())  # second in a row: 10 s
    with pytest.raises(ServiceUnavailable, match="cooling down") as caught:
        await scheduler.submit(spec())
    assert caught.value.retry_after == 10
    await trio.sleep(10)
    await scheduler.submit(spec())
    assert (await next_job(node)).job_id == "chatcmpl-1"


async def test_a_refusal_is_retried_elsewhere_and_a_node_error_after_output_is_reported(
    net, autojump_clock
) -> None:
    from owlrun.protocol import JobError

    scheduler, reg, hook = net
    a = add_node(reg, "a")
    handle = await scheduler.submit(spec())
    job = await next_job(a)
    b = add_node(reg, "b")
    a.link.attempts[job.job_id].deliver_nowait(
        JobError(job_id=job.job_id, message="busy", retryable=True)
    )
    job = await next_job(b)
    assert a.link.cooldown_until == 0  # a retryable refusal is not the node's fault
    attempt = b.link.attempts[job.job_id]
    attempt.deliver_nowait(Chunk(job_id=job.job_id, delta=Delta(content="x")))
    attempt.deliver_nowait(JobError(job_id=job.job_id, message="engine died", retryable=False))
    assert await handle.events.receive() == Delta(content="x")
    failure = await handle.events.receive()
    assert isinstance(failure, Failure) and "engine died" in failure.error.message
    await handle.finished.wait()
    assert hook.results[0].outcome == "node_failed" and hook.results[0].dispatched


async def test_a_job_run_here_whose_caller_fails_to_take_it_is_forgotten(
    net, autojump_clock
) -> None:
    """``run_here`` hands the handle to its caller before the job runs: should that
    fail, nothing is dispatched or settled (the caller still holds the reservation and
    gives it back), and the node's slot is free again."""
    scheduler, reg, hook = net
    node = add_node(reg, "n")
    seen: list[object] = []

    def refuse(handle: object) -> None:
        raise RuntimeError("the caller could not take the job")

    with pytest.raises(RuntimeError):
        await scheduler.run_here(spec(), seen.append, refuse)
    assert hook.results == [] and seen == []
    assert scheduler.jobs == {} and node.link.attempts == {}
    assert node.outbox.statistics().current_buffer_used == 0  # no job was sent
    # The slot is free: the next job gets it at once.
    handle = await scheduler.submit(spec("chatcmpl-2"))
    assert (await next_job(node)).job_id == "chatcmpl-2"
    handle.cancel_nowait("client_gone")
