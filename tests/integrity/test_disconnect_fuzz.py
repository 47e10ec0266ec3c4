"""A disconnect fuzz: 200 requests (streamed and not, free and paid) whose clients vanish
at random moments (0 to 50 ms after sending) or after a random number of chunks, or
stay to the end. Afterwards, for each request, the engine's own log and the ledger must
agree with DESIGN section 3's table: every job was served or cancelled on the engine
within 2 s of its client leaving, nothing was billed beyond what the engine produced,
a client that left after dispatch paid its prompt, free quota and reservations are
consistent, and the ledger check passes."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ledger import book
from routecat.money.keys import hash_key
from tests.clients import MODEL
from tests.fakes import Knobs
from tests.servers import catalog, fund, register, start_network

PAID_MODEL = "paid-model:1b"  # not in the free catalog
REQUESTS = 200
CREDIT_SATS = 10_000


@attrs.define
class Plan:
    index: int
    key: str
    free: bool
    stream: bool
    vanish_ms: float | None  # close the socket this long after sending
    vanish_chunks: int | None  # or after reading this many chunks (streams)
    vanished_at: float | None = None
    finished: bool = False  # the client read the whole answer

    @property
    def text(self) -> str:
        return f"fuzz {self.index} " + "words " * 12

    def body(self) -> dict[str, Any]:
        model = MODEL if self.free else PAID_MODEL
        body = {"model": model, "messages": [{"role": "user", "content": self.text}]}
        return {**body, "stream": self.stream}


async def run_raw(url: str, plan: Plan) -> None:
    """Send the request on a raw socket and vanish after ``vanish_ms``."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(plan.body()).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {plan.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
    )
    assert plan.vanish_ms is not None
    await trio.sleep(plan.vanish_ms / 1000)
    await stream.aclose()
    plan.vanished_at = time.monotonic()


async def run_client(url: str, plan: Plan) -> None:
    headers = {"Authorization": f"Bearer {plan.key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
        if not plan.stream:
            r = await c.post("/v1/chat/completions", json=plan.body())
            assert r.status_code == 200, (plan.index, r.text)
            plan.finished = True
            return
        async with c.stream("POST", "/v1/chat/completions", json=plan.body()) as r:
            assert r.status_code == 200
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if plan.vanish_chunks is not None and chunks >= plan.vanish_chunks:
                        break
                    if line == "data: [DONE]":
                        plan.finished = True
        if not plan.finished:
            plan.vanished_at = time.monotonic()


async def test_clients_vanishing_at_random_moments(nursery: trio.Nursery, tmp_path: Path) -> None:
    rng = random.Random(20261201)
    with trio.fail_after(240):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            knobs=Knobs(delay=0.004, models=[MODEL, PAID_MODEL]),
            max_jobs=64,
            credit_sats=0,
            free_daily_budget_sats="100000000",
        )
        gw = net.gateway.gw
        plans: list[Plan] = []
        async with net.gateway.client() as c:
            for i in range(REQUESTS):
                key = await register(c, f"fuzz {i}")
                free = i % 2 == 0
                if not free:
                    await fund(net.gateway, key, CREDIT_SATS)
                stream = rng.random() < 0.6
                roll = rng.random()
                vanish_ms = vanish_chunks = None
                if roll < 0.5:
                    vanish_ms = rng.uniform(0, 50)
                elif roll < 0.8 and stream:
                    vanish_chunks = rng.randint(1, 12)
                plans.append(Plan(i, key, free, stream, vanish_ms, vanish_chunks))
        for start in range(0, REQUESTS, 25):
            async with trio.open_nursery() as batch:
                for plan in plans[start : start + 25]:
                    runner = run_raw if plan.vanish_ms is not None else run_client
                    batch.start_soon(runner, net.url, plan)
        with trio.fail_after(10):
            while gw.scheduler.jobs or net.engine.active:
                await trio.sleep(0.05)

        log = {entry["text"]: entry for entry in net.engine.log}

        def read(db: Any) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for plan in plans:
                key_id = db.execute(
                    "SELECT id FROM api_keys WHERE key_hash = ?", (hash_key(plan.key),)
                ).fetchone()[0]
                jobs = db.execute(
                    "SELECT outcome, tokens_in, tokens_out, cost_msat, free FROM jobs"
                    " WHERE key_id = ?",
                    (key_id,),
                ).fetchall()
                used = db.execute(
                    "SELECT COALESCE(SUM(used), 0) FROM free_usage WHERE key_id = ?", (key_id,)
                ).fetchone()[0]
                out[plan.key] = (
                    [dict(j) for j in jobs],
                    book.balance(db, book.user_account(key_id))[0],
                    used,
                )
            out["reservations"] = db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
            out["check"] = book.check(db)
            out["all_free"] = [
                tuple(r) for r in db.execute("SELECT * FROM free_usage WHERE used != 1").fetchall()
            ]
            return out

        state = await gw.store.read(read)
        assert state["check"].ok, state["check"].problems()
        assert state["reservations"] == 0
        vanished = served = 0
        for plan in plans:
            jobs, balance_msat, free_used = state[plan.key]
            entry = log.get(plan.text)
            assert len(jobs) <= 1
            job = jobs[0] if jobs else None
            if plan.finished:
                served += 1
                assert entry is not None and entry["complete"], plan
                assert job is not None and job["outcome"] == "done", (plan, job)
                assert job["tokens_out"] == entry["tokens"]
            else:
                vanished += 1
                assert plan.vanished_at is not None
                if entry is not None:
                    # Served or cancelled on the engine within 2 s of the client leaving.
                    assert entry["ended"] - plan.vanished_at < 2.0, (plan, entry)
                if job is not None:
                    assert job["outcome"] in ("client_gone", "done"), (plan, job)
                    assert job["tokens_in"] > 0  # dispatched: the prompt is paid
                    if entry is None:
                        assert job["tokens_out"] == 0  # nothing was produced
                    elif entry["complete"] and job["outcome"] == "done":
                        assert job["tokens_out"] == entry["tokens"]
                    else:
                        # What was delivered, estimated: never beyond the byte bound of
                        # what the engine produced.
                        assert job["tokens_out"] <= entry["bytes"] + 1, (plan, job, entry)
            cost = job["cost_msat"] if job else 0
            if plan.free:
                assert balance_msat == 0
                assert free_used == (1 if job else 0), (plan.index, job, entry)
            else:
                assert balance_msat == CREDIT_SATS * 1000 - cost
                assert free_used == 0
        assert vanished > 80 and served > 30  # the fuzz exercised both
