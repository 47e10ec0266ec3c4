"""The agent's sender in virtual time: tokens coalesce into ``chunks`` frames only
within the batch window, never wait longer, and keep their order per job."""

from __future__ import annotations

from typing import Any

import attrs
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given

from owlrun.agent import Agent
from owlrun.identity import Identity
from owlrun.protocol import Chunk, Chunks, Delta, Done, Heartbeat, Message, Usage, decode


@attrs.define
class Wire:
    """The websocket: what left, and when (virtual time)."""

    frames: list[tuple[float, Message]] = attrs.Factory(list)

    async def send_message(self, text: str) -> None:
        self.frames.append((trio.current_time(), decode(text)))


def agent(window: float) -> Agent:
    return Agent("http://gateway", Identity("node-1", "s" * 32), engine=None, batch_window=window)  # type: ignore[arg-type]


def tokens(frames: list[tuple[float, Message]], job_id: str) -> list[str]:
    out: list[str] = []
    for _, frame in frames:
        if isinstance(frame, Chunk) and frame.job_id == job_id:
            out.append(frame.delta.content or "")
        elif isinstance(frame, Chunks) and frame.job_id == job_id:
            out += [d.content or "" for d in frame.deltas]
    return out


async def run_sender(window: float, feed: Any) -> Wire:
    wire = Wire()
    send, receive = trio.open_memory_channel[Message](1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent(window)._sender, wire, receive)
        async with send:
            await feed(send)
    return wire


@pytest.mark.parametrize("window", [0.005, 0.05])
async def test_a_fast_engine_sends_a_few_frames_and_done_is_not_held(
    autojump_clock: trio.testing.MockClock, window: float
) -> None:
    async def feed(send: trio.MemorySendChannel[Message]) -> None:
        for i in range(64):  # 64 tokens, 0.1 ms apart
            await send.send(Chunk("job-a", Delta(f"t{i} ")))
            await trio.sleep(0.0001)
        await send.send(Done("job-a", "stop", Usage(3, 64)))

    started = trio.current_time()
    wire = await run_sender(window, feed)
    assert tokens(wire.frames, "job-a") == [f"t{i} " for i in range(64)]
    assert isinstance(wire.frames[-1][1], Done)
    assert len(wire.frames) <= 4  # the first token alone, the rest batched, then done
    assert isinstance(wire.frames[0][1], Chunk)  # the first token leaves at once
    assert wire.frames[0][0] - started < 0.001
    # Every token left within the window of its arrival (i-th token came at i * 0.1 ms),
    # and done left as soon as it came, not at the end of a window.
    assert wire.frames[-1][0] - started <= 64 * 0.0001 + window + 0.001


async def test_a_slow_engine_sends_each_token_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent_at: list[float] = []

    async def feed(send: trio.MemorySendChannel[Message]) -> None:
        for i in range(10):  # slower than the window: no token ever waits
            sent_at.append(trio.current_time())
            await send.send(Chunk("job-a", Delta(f"t{i}")))
            await trio.sleep(0.02)
        await send.send(Done("job-a", "stop", None))

    wire = await run_sender(0.005, feed)
    chunks = [(at, f) for at, f in wire.frames if isinstance(f, Chunk)]
    assert [f.delta.content for _, f in chunks] == [f"t{i}" for i in range(10)]
    assert all(abs(at - sent) < 0.0001 for (at, _), sent in zip(chunks, sent_at, strict=True))


async def test_interleaved_jobs_keep_their_order_and_other_frames_their_place(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def feed(send: trio.MemorySendChannel[Message]) -> None:
        for i in range(5):
            await send.send(Chunk("job-a", Delta(f"a{i}")))
            await send.send(Chunk("job-b", Delta(f"b{i}")))
        await send.send(Heartbeat(in_flight=2))
        await send.send(Chunk("job-b", Delta("b5")))
        await send.send(Done("job-a", "stop", None))
        await send.send(Done("job-b", "stop", None))

    wire = await run_sender(0.05, feed)
    assert tokens(wire.frames, "job-a") == [f"a{i}" for i in range(5)]
    assert tokens(wire.frames, "job-b") == [f"b{i}" for i in range(6)]
    kinds = [type(f).__name__ for _, f in wire.frames]
    # Chunks queued before the heartbeat leave before it; b5 after it; each done after
    # its job's last token.
    beat = kinds.index("Heartbeat")
    assert len(tokens(wire.frames[:beat], "job-b")) == 5
    done_a = next(
        i for i, (_, f) in enumerate(wire.frames) if isinstance(f, Done) and f.job_id == "job-a"
    )
    done_b = next(
        i for i, (_, f) in enumerate(wire.frames) if isinstance(f, Done) and f.job_id == "job-b"
    )
    assert tokens(wire.frames[done_b:], "job-b") == []
    assert tokens(wire.frames[done_a:], "job-a") == []


async def test_more_tokens_than_a_frame_holds_are_split(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from owlrun.protocol import MAX_BATCH

    async def feed(send: trio.MemorySendChannel[Message]) -> None:
        await send.send(Chunk("job-a", Delta("first")))
        for i in range(MAX_BATCH + 10):
            send.send_nowait(Chunk("job-a", Delta(str(i))))

    wire = await run_sender(0.01, feed)
    assert tokens(wire.frames, "job-a") == ["first"] + [str(i) for i in range(MAX_BATCH + 10)]
    assert all(len(f.deltas) <= MAX_BATCH for _, f in wire.frames if isinstance(f, Chunks))


@given(st.text(max_size=20))
def test_the_batch_window_option_takes_only_0_to_100_ms(text: str) -> None:
    from owlrun.cli import build_parser

    parser = build_parser()
    try:
        wanted = float(text)
    except ValueError:
        wanted = None
    if wanted is not None and 0 <= wanted <= 100:
        args = parser.parse_args(["--gateway", "http://g", "--batch-window-ms", text])
        assert args.batch_window_ms == wanted
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["--gateway", "http://g", "--batch-window-ms", text])
    assert parser.parse_args(["--gateway", "http://g"]).batch_window_ms == 5.0
