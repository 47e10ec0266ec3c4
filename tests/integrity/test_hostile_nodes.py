"""A hostile-node property test: a rogue node sends generated sequences of valid and
invalid frames (wrong types; negative, huge, fractional, NaN and string numbers;
unknown types; frames for other jobs; late frames after cancels; done before chunks;
duplicates; disconnects at any point) while an honest client uses an honest node.

One live gateway serves every example: it runs in its own thread with its own
``trio.run`` (a module fixture), and each hypothesis example is a fresh ``trio.run``
in the test's thread that talks to it over real sockets (pytest-trio would give each
example its own ``trio.run``, so the shared server cannot live inside one). Checks
that need the gateway's state run in its thread through ``trio.from_thread``.

After every example: the process is alive, the strengthened ``ledger check`` passes,
no user balance rose (there are no top-ups here), no provider or operator-fee account
went negative, the subsidy moved only by the cost of free jobs, every honest request
got its exact answer, and no reservation is left once the jobs are done.

``ROUTECAT_HOSTILE_EXAMPLES`` sets the number of examples (``nox -s hostile`` runs many
more than the default suite).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger import book
from ledger.money import cost_msat
from routecat.gateway import Gateway
from tests.clients import chat, read_sse, text_of
from tests.rogue import ROGUE_MODEL, rogue_node
from tests.servers import LiveGateway

PAID_MODEL = "rogue-paid"
EXAMPLES = int(os.environ.get("ROUTECAT_HOSTILE_EXAMPLES", "200"))
# The most one rogue job may cost its payer: its prompt bound ("rogue job": 9 bytes, one
# message, + 8 + 64) and the default max_tokens + 1, at $500/1M tokens and $100,000/BTC.
MAX_JOB_COST = cost_msat(9 + 8 + 64, 4096 + 1, Decimal(500), Decimal(500), Decimal(100_000))


# -- what a rogue node sends -------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=0, max_value=2**31),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
texts = st.one_of(st.text(max_size=12), st.none(), numbers)
tool_calls = st.one_of(
    st.none(),
    st.lists(
        st.fixed_dictionaries(
            {
                "index": numbers,
                "function": st.fixed_dictionaries({"name": texts, "arguments": texts}),
            }
        ),
        max_size=3,
    ),
    numbers,
)
deltas = st.fixed_dictionaries(
    {"content": texts},
    optional={"reasoning": texts, "refusal": texts, "tool_calls": tool_calls},
)
targets = st.sampled_from(["job", "job", "job", "other"])
counts = st.one_of(
    st.integers(min_value=0, max_value=300),
    st.integers(min_value=2**16, max_value=2**31),
    numbers,
)
usages = st.one_of(
    st.fixed_dictionaries({"prompt_tokens": counts, "completion_tokens": counts}),
    st.fixed_dictionaries({}, optional={"prompt_tokens": counts, "completion_tokens": counts}),
    st.none(),
    numbers,
)
finishes = st.sampled_from(["stop", "length", "tool_calls", "weird", 5])
done_frames = st.tuples(
    st.just("done"), targets, st.fixed_dictionaries({"finish_reason": finishes, "usage": usages})
)
frames = st.one_of(
    st.tuples(st.just("chunk"), targets, deltas),
    st.tuples(st.just("chunks"), targets, st.lists(deltas, min_size=0, max_size=4)),
    done_frames,
    st.tuples(st.just("error"), targets, st.fixed_dictionaries({"retryable": numbers})),
    st.tuples(st.just("cancelled"), targets, st.just({})),
    # An embedding's result for a chat job (or anyone's): never this job's answer.
    st.tuples(
        st.just("embedded"),
        targets,
        st.fixed_dictionaries(
            {"vectors": st.one_of(st.lists(st.text(max_size=12), max_size=3), numbers)},
            optional={"usage": usages},
        ),
    ),
    st.tuples(st.just("heartbeat"), st.just("none"), st.fixed_dictionaries({"in_flight": numbers})),
    st.tuples(st.just("models"), st.just("none"), st.fixed_dictionaries({"models": numbers})),
    st.tuples(st.sampled_from(["garbage", "unknown", "hello"]), st.just("none"), st.just({})),
    st.tuples(st.just("pause"), st.just("none"), st.just({})),
)
# Most jobs end with a done frame (the interesting money path), some with an error or a
# bare disconnect; frames may follow the end (duplicates, late frames).
endings = st.one_of(
    done_frames,
    done_frames,
    st.tuples(st.just("error"), st.just("job"), st.fixed_dictionaries({"retryable": numbers})),
    st.just(("pause", "none", {})),
)
# Honest output, mostly, so that a hostile frame or ending is reached with a live job.
honest_chunks = st.tuples(
    st.just("chunk"),
    st.just("job"),
    st.fixed_dictionaries({"content": st.text(max_size=8)}, optional={"reasoning": st.text()}),
)
scripts = st.builds(
    lambda before, end, after: [*before, end, *after],
    st.lists(st.one_of(honest_chunks, honest_chunks, frames), max_size=6),
    endings,
    st.lists(frames, max_size=3),
)


def render(kind: str, target: str, fields: dict[str, Any], job_id: str) -> str | None:
    """One frame as text, or None for a pause."""
    if kind == "pause":
        return None
    if kind == "garbage":
        return "{not json"
    if kind == "unknown":
        return json.dumps({"type": "mint", "amount": 10**9})
    if kind == "hello":
        return json.dumps({"type": "hello", "node_id": "x", "protocol_version": 2})
    target_id = job_id if target == "job" else "chatcmpl-someone-else"
    frame: dict[str, Any]
    if kind == "chunk":
        frame = {"type": "chunk", "job_id": target_id, "delta": fields}
    elif kind == "chunks":
        frame = {"type": "chunks", "job_id": target_id, "deltas": fields}
    else:
        frame = {"type": kind, **fields}
        if target != "none":
            frame["job_id"] = target_id
    return json.dumps(frame, allow_nan=True)


# -- the example ---------------------------------------------------------------------------


def money(gw: Gateway) -> Any:
    async def read() -> dict[str, Any]:
        def snapshot(db: Any) -> dict[str, Any]:
            free_cost = db.execute(
                "SELECT COALESCE(SUM(cost_msat), 0) FROM jobs WHERE free = 1"
            ).fetchone()[0]
            return {
                "check": book.check(db),
                "paid": book.balance(db, "user:1")[0],
                "free": book.balance(db, "user:2")[0],
                "subsidy": book.balance(db, book.SUBSIDY)[0],
                "free_cost": int(free_cost),
                "reservations": db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0],
                "jobs": len(gw.scheduler.jobs),
            }

        return await gw.store.read(snapshot)

    return read()


async def honest_requests(url: str, key: str, tag: str, failures: list[str]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        r = await c.post("/v1/chat/completions", json=chat(f"honest {tag}"))
        if r.status_code != 200 or r.json()["choices"][0]["message"]["content"] != (
            f"You said: honest {tag}"
        ):
            failures.append(f"non-stream: {r.status_code} {r.text[:200]}")
        async with c.stream(
            "POST", "/v1/chat/completions", json=chat(f"streamed {tag}", stream=True)
        ) as s:
            events, done, _ = await read_sse(s)
        if not done or text_of(events) != f"You said: streamed {tag}":
            failures.append(f"stream: {events[-1:]}")


async def rogue_session(live: LiveGateway, script: list[Any], stream: bool, free: bool) -> int:
    """Run one script against one job; returns the rogue client's HTTP status."""
    key = live.free_key if free else live.paid_key
    model = ROGUE_MODEL if free else PAID_MODEL
    status: list[int] = []
    models = [{"name": ROGUE_MODEL}, {"name": PAID_MODEL}]
    async with trio.open_nursery() as nursery:

        async def client() -> None:
            body = {**chat("rogue job"), "model": model, "stream": stream}
            async with (
                httpx.AsyncClient(base_url=live.url, timeout=30) as c,
                c.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                ) as r,
            ):
                await r.aread()
                status.append(r.status_code)

        async with rogue_node(live.url, models=models) as rogue:
            nursery.start_soon(client)
            with trio.fail_after(10):
                job = await rogue.next_job()
            for kind, target, fields in script:
                frame = render(kind, target, fields, job.job_id)
                if frame is None:
                    await trio.sleep(0.05)
                    continue
                if rogue.closed:
                    break
                try:
                    await rogue.send(frame)
                except Exception:
                    break  # the gateway closed us: that is its right
            # Then disconnect (if not closed already): the job ends in whatever state.
    return status[0] if status else 0


def wait_until(live: LiveGateway, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(200):
        state = live.call(money)
        if predicate(state):
            return state  # type: ignore[no-any-return]
        trio.run(trio.sleep, 0.05)
    return live.call(money)  # type: ignore[no-any-return]


def _done(usage: Any, finish: Any = "stop") -> list[Any]:
    return [
        ("chunk", "job", {"content": "hi"}),
        ("done", "job", {"finish_reason": finish, "usage": usage}),
    ]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts, stream=st.booleans(), free=st.booleans())
# The attacks seen before, always tried (then hypothesis explores around them).
@example(
    script=_done({"prompt_tokens": -(10**9), "completion_tokens": 5}), stream=False, free=False
)
@example(
    script=_done({"prompt_tokens": 2**31, "completion_tokens": 2**31}), stream=True, free=False
)
@example(
    script=_done({"prompt_tokens": 2**31, "completion_tokens": 2**31}), stream=False, free=True
)
@example(
    script=_done({"prompt_tokens": float("nan"), "completion_tokens": 1.5}),
    stream=False,
    free=False,
)
@example(script=_done({"prompt_tokens": "7", "completion_tokens": True}, 5), stream=True, free=True)
def test_hostile_node_cannot_break_the_invariants(
    live: LiveGateway, script: list[Any], stream: bool, free: bool
) -> None:
    before = live.call(money)
    failures: list[str] = []

    async def example() -> int:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(honest_requests, live.url, live.paid_key, str(len(script)), failures)
            with trio.fail_after(30):
                return await rogue_session(live, script, stream, free)

    status = trio.run(example)
    assert status in (200, 502, 503), status  # never a 500, never a hang
    after = wait_until(live, lambda s: s["jobs"] == 0 and s["reservations"] == 0)
    assert live.error is None, live.error
    assert failures == []
    assert after["jobs"] == 0 and after["reservations"] == 0
    check = after["check"]
    assert check.ok, check.problems()
    assert after["paid"] <= before["paid"]  # no balance rises but by a top-up
    assert before["paid"] - after["paid"] <= MAX_JOB_COST  # usage verified, never trusted
    assert after["free"] == before["free"] == 0  # free requests never touch the balance
    assert after["subsidy"] == -after["free_cost"]  # the subsidy paid free jobs, exactly

    async def alive() -> int:
        async with httpx.AsyncClient(base_url=live.url) as c:
            return (await c.get("/healthz")).status_code

    assert trio.run(alive) == 200
