"""Money end to end: free tier, paid admission, exact billing, overdraft bound, limits,
verified usage, subsidy farming, the price feed and crash safety."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ledger import book
from routecat.clock import Clock
from routecat.money import earnings as earnings_module
from routecat.money.settlement import billable
from routecat.network.jobs import JobResult
from tests.clients import MODEL, chat, read_sse, wait_for
from tests.fakes import Knobs, serve_app, start_engine
from tests.servers import (
    assert_error,
    balance,
    catalog,
    database,
    fund,
    ledger_ok,
    register,
    reopen,
    start_network,
    start_node,
)


# 1 input token = 1 sat, 1 output token = 2 sats at the tests' pinned $100,000/BTC.
async def test_free_then_paid_billing_is_exact(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0)
        assert await balance(net) == {"balance_sats": 0, "balance_msat": 0, "free_remaining": 10}
        async with net.client() as c:
            for i in range(10):
                r = await c.post(
                    "/v1/chat/completions", json=chat(f"free {i}"), headers={"X-Playground": "true"}
                )
                assert r.status_code == 200, r.text
                # Free requests cost the user nothing; the usage shown is the usage billed.
                assert r.json()["usage"]["cost_msat"] > 0
            assert (await balance(net))["free_remaining"] == 0
            r = await c.post(
                "/v1/chat/completions",
                json=chat("no more"),
                headers={"X-Playground": "true", "X-Free-Tier": "1"},
            )
            assert_error(r, 402, "insufficient_balance")
            await fund(net.gateway, net.key, 1000)
            r = await c.post("/v1/chat/completions", json=chat("paid one"))
            assert r.status_code == 200, r.text
            usage = r.json()["usage"]
            # "You said: paid one" is 4 word tokens; the fake engine reports 2+4 prompt tokens.
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (6, 4)
            expected = 6 * 1000 + 4 * 2000
            assert usage["cost_msat"] == expected
            assert r.headers["X-RouteCat-Cost-Msat"] == str(expected)
            assert usage["total_tokens"] == 10
            after = await balance(net)
            assert after["balance_msat"] == 1_000_000 - expected
            assert after["balance_sats"] == (1_000_000 - expected) // 1000
            # Streams bill the same way and show the billed usage in the final chunk.
            async with c.stream(
                "POST",
                "/v1/chat/completions",
                json=chat("paid two", stream=True, stream_options={"include_usage": True}),
            ) as s:
                events, done, _ = await read_sse(s)
            assert done
            assert events[-1]["usage"]["cost_msat"] == expected
            assert (await balance(net))["balance_msat"] == 1_000_000 - 2 * expected
            audit = (await c.get("/v1/audit?per_page=2")).json()
            assert audit["total"] == 12
            newest = audit["jobs"][0]
            assert newest["cost_msat"] == expected and newest["cost_sats"] == expected // 1000
            assert set(newest) == {
                "id",
                "model",
                "tokens_in",
                "tokens_out",
                "duration_ms",
                "cost_sats",
                "cost_msat",
                "timestamp",
            }
            text = json.dumps(audit)
            assert net.key[:11] not in text and "node_" not in text
            page2 = (await c.get("/v1/audit?page=2&per_page=2")).json()
            assert page2["page"] == 2 and page2["jobs"][0]["id"] != newest["id"]
            assert_error(await c.get("/v1/audit?page=0"), 400, "invalid_request")
            stats = (await c.get("/v1/stats")).json()
            assert stats["jobs_24h"] == 12 and stats["tokens_24h"] > 0
            assert stats["btc_usd"] == 100000.0 and stats["btc_usd_source"] == "pinned"
            assert stats["nodes_online"] == 1
            models = (await c.get("/v1/models")).json()["data"]
            pricing = models[0]["routecat_pricing"]
            assert pricing["input_per_1m_tokens_usd"] == 1000.0
            # Integers (a client decoding into an int type), beside the exact msat.
            assert pricing["input_per_1m_tokens_sats"] == 1_000_000
            assert isinstance(pricing["input_per_1m_tokens_sats"], int)
            assert pricing["output_per_1m_tokens_msat"] == 2_000_000_000
            assert models[0]["max_output_tokens"] is None  # no catalog ceiling, no report
        await ledger_ok(net)
        # The provider earned 95% of every job; paid ones are payable, free ones held.
        earnings = await net.gateway.gw.earnings.of(net.nodes[0].id)
        assert earnings["payable_msat"] == 2 * (expected * 95 // 100)
        assert earnings["held_msat"] > 0


async def test_overdraft_bounded_by_one_request(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            credit_sats=15,
            max_jobs=200,
            nodes=2,
            free_daily_requests="0",
        )
        body = chat("hi", max_tokens=2000)  # no free requests: paid
        statuses: list[int] = []
        async with net.gateway.client(
            headers={"Authorization": f"Bearer {net.key}"}, limits=httpx.Limits(max_connections=250)
        ) as c:

            async def one() -> None:
                statuses.append((await c.post("/v1/chat/completions", json=body)).status_code)

            async with trio.open_nursery() as inner:
                for _ in range(200):
                    inner.start_soon(one)
        cost = 5 * 1000 + 3 * 2000  # "hi": 1+4 prompt tokens, "You said: hi": 3 tokens
        assert statuses.count(200) <= 2
        assert statuses.count(200) + statuses.count(402) == 200
        final = (await balance(net))["balance_msat"]
        assert final == 15_000 - statuses.count(200) * cost
        assert final >= -cost
        assert (await net.gateway.gw.store.read(lambda db: book.balance(db, "user:1")))[1] == 0
        assert net.gateway.gw.admissions.held("user:1") == 0  # SQLite: held in memory
        await ledger_ok(net)


async def test_settlement_races_settle_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path))
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("race", max_tokens=2000))
        job_id = r.json()["id"]
        billing = net.gateway.gw.settlement
        original = await net.gateway.gw.store.read(
            lambda db: db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        before = await balance(net)
        # Replay the same job's settlement as a disconnect and a node failure would, at once.
        from routecat.money.admission import Admission
        from routecat.money.pricing import Price
        from routecat.network.jobs import JobSpec

        spec = JobSpec(
            job_id,
            "chat",
            "llama3.1:8b",
            {},
            True,
            1,
            2000,
            50,
            admission=Admission(
                False, Decimal(100000), Price(Decimal(1000), Decimal(2000)), 0, "x"
            ),
        )
        results = [
            JobResult(spec, outcome, "node_x", None, None, 5, 20, 1, (), 0.0, 1.0, 0.1)
            for outcome in ("client_gone", "node_failed", "client_gone")
        ]
        bills: list[Any] = []
        async with trio.open_nursery() as inner:
            for result in results:
                inner.start_soon(lambda result=result: _settle(billing, result, bills))
        assert all(b.cost_msat == original["cost_msat"] for b in bills)
        assert await balance(net) == before
        assert net.settled == {job_id: 1}
        await ledger_ok(net)


async def _settle(billing: Any, result: JobResult, out: list[Any]) -> None:
    out.append(await billing.settle(result))


def test_what_is_billed_by_outcome() -> None:
    """DESIGN section 3's table, row by row."""
    from routecat.network.jobs import JobSpec

    def result(outcome: str, stream: bool, chunks: int, dispatched: bool = True) -> JobResult:
        spec = JobSpec("j", "chat", "m", {}, stream, 1, 10, 10)
        return JobResult(
            spec, outcome, "n", None, None, chunks, chunks * 3, 1, (), 0.0, 1.0, None, dispatched
        )

    assert billable(result("done", False, 3))
    assert not billable(result("client_gone", True, 0, dispatched=False))  # left while queued
    assert billable(result("client_gone", True, 0))  # left after dispatch: the prompt
    assert billable(result("client_gone", False, 3))  # left after output started
    assert not billable(result("node_failed", True, 0, dispatched=False))  # before 1st token
    assert not billable(result("timeout", False, 0, dispatched=False))
    assert billable(result("node_failed", True, 3))  # stream: error event, delivered billed
    assert billable(result("timeout", True, 3))
    assert not billable(result("node_failed", False, 3))  # 502: the client got nothing
    assert not billable(result("no_capacity", True, 0, dispatched=False))
    assert billable(result("shutdown", True, 3))  # cut after the drain time
    assert billable(result("shutdown", True, 0))  # dispatched: the prompt


async def test_free_tier_resets_at_midnight_utc(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0, free_daily_requests="3"
        )
        clock = [datetime(2026, 11, 29, 23, 59, 0, tzinfo=UTC).timestamp()]
        net.gateway.gw.clock.wall = lambda: clock[0]
        async with net.client() as c:
            for _ in range(3):
                assert (await c.post("/v1/chat/completions", json=chat("x"))).status_code == 200
            assert (await balance(net))["free_remaining"] == 0
            assert_error(
                await c.post("/v1/chat/completions", json=chat("x")), 402, "insufficient_balance"
            )
            clock[0] += 59.5  # 23:59:59.5
            assert_error(
                await c.post("/v1/chat/completions", json=chat("x")), 402, "insufficient_balance"
            )
            clock[0] += 1  # 00:00:00.5 the next day
            assert (await balance(net))["free_remaining"] == 3
            assert (await c.post("/v1/chat/completions", json=chat("x"))).status_code == 200
            assert (await balance(net))["free_remaining"] == 2


async def test_free_request_failing_before_first_token_keeps_quota(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            credit_sats=0,
            knobs=Knobs(fail_status=500),
            max_attempts="1",
        )
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("x"))
            assert r.status_code in (502, 503), r.text
        assert (await balance(net))["free_remaining"] == 10
        await ledger_ok(net)


async def test_rate_limit_retry_after_is_exact(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), rate_limit_per_minute="60"
        )
        # Near the real wall clock: on PostgreSQL the cluster round prunes stored hits
        # older than two hours by the real clock (a time of 1970 would be pruned).
        start = float(int(time.time()))
        now = [start]
        limiter = net.gateway.gw.request_limit
        limiter.clock = lambda: now[0]
        async with net.client() as c:
            for i in range(60):
                now[0] = start + i * 0.5  # 60 requests over 29.5 s
                assert (
                    await c.post("/v1/chat/completions", json=chat("x", max_tokens=5))
                ).status_code == 200
            now[0] = start + 30
            r = await c.post("/v1/chat/completions", json=chat("x", max_tokens=5))
            assert_error(r, 429, "rate_limit_exceeded")
            assert r.headers["Retry-After"] == "30"  # the first request leaves at start + 60
            now[0] = start + 30 + 30
            assert (
                await c.post("/v1/chat/completions", json=chat("x", max_tokens=5))
            ).status_code == 200
            # Reads have their own, more generous limit.
            assert (await c.get("/v1/auth/balance")).status_code == 200


async def test_cheating_and_silent_nodes(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), knobs=Knobs(report_factor=10)
        )
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("hello there", max_tokens=2000))
        usage = r.json()["usage"]
        # Reported 40 completion tokens for 21 bytes: billed at the bound, 21 + 1.
        assert usage["completion_tokens"] == len(b"You said: hello there") + 1
        cheater = net.gateway.gw.registry.nodes[net.nodes[0].id]
        assert cheater.reputation < 1.0
        assert cheater.cooldown_until > trio.current_time()
        assert net.gateway.gw.reputation.penalties[cheater.id] == 1

        engine = await start_engine(nursery, Knobs(report_usage=False))
        silent = await start_node(nursery, net.url, engine)
        await net.nodes[0].kill()
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("hello there", max_tokens=2000))
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        # No report: billed an estimate (bytes / 4), not the bound.
        assert usage["completion_tokens"] == 6  # ceil(21 / 4)
        assert usage["completion_tokens"] < len(b"You said: hello there") + 1
        assert net.gateway.gw.registry.nodes[silent.id].reputation < 1.0
        earned = await net.gateway.gw.earnings.of(silent.id)
        assert earned["earned_msat"] == usage["cost_msat"] * 95 // 100


async def test_subsidy_budget_stops_self_dealing(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        # A budget of 100 sats a day; each free job costs 11 sats and reserves 38 here.
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), free_daily_budget_sats="100"
        )
        gw = net.gateway.gw
        served = refused = 0
        async with net.gateway.client() as c:
            for i in range(12):
                key = await register(c, f"sock puppet {i}")
                r = await c.post(
                    "/v1/chat/completions",
                    json=chat("hi", max_tokens=5),
                    headers={"Authorization": f"Bearer {key}"},
                )
                if r.status_code == 200:
                    served += 1
                else:
                    assert_error(r, 402, "insufficient_balance")
                    refused += 1
        assert served >= 1 and refused >= 1
        spent = await gw.store.read(
            lambda db: db.execute("SELECT SUM(spent_msat) FROM subsidy_days").fetchone()[0]
        )
        assert spent <= 100_000
        node = net.nodes[0].id
        earnings = await gw.earnings.of(node)
        assert earnings["earned_msat"] > 0
        assert earnings["payable_msat"] == 0  # all of it is in probation
        assert earnings["held_msat"] == earnings["earned_msat"]
        real_wall = gw.clock.wall
        gw.clock.wall = lambda: real_wall() + 7 * 86400 + 1
        after = await gw.earnings.of(node)
        assert after["payable_msat"] == earnings["earned_msat"]
        assert after["held_msat"] == 0
        await ledger_ok(net)


async def test_each_node_is_told_its_own_earnings(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earnings are read for many nodes at once (a batch per read transaction): with
    more nodes than a batch, every agent is told exactly its own figures, and a batch
    whose read fails is told on a later round."""
    monkeypatch.setattr(earnings_module, "PUBLISH_BATCH", 2)
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path, nodes=5)
        gw = net.gateway.gw
        real = earnings_module.Earnings.of_many
        failures: list[list[str]] = []

        async def failing_once(self: Any, node_ids: list[str]) -> Any:
            if not failures:
                failures.append(node_ids)
                raise RuntimeError("the store is briefly away")
            return await real(self, node_ids)

        monkeypatch.setattr(earnings_module.Earnings, "of_many", failing_once)
        async with net.client() as c:
            for i in range(10):
                r = await c.post("/v1/chat/completions", json=chat("word " * (i + 1)))
                assert r.status_code == 200, r.text
        await wait_for(lambda: len(net.settled) == 10, timeout=10)  # figures final
        figures = {n.id: (await real(gw.earnings, [n.id]))[n.id] for n in net.nodes}
        fields = ("earned_msat", "held_msat", "payable_msat", "paid_msat", "pending_msat")

        def told() -> bool:
            return all(
                n.agent.earnings is not None
                and all(getattr(n.agent.earnings, f) == figures[n.id][f] for f in fields)
                for n in net.nodes
            )

        await wait_for(told, timeout=15)
        assert len(failures) == 1 and len(failures[0]) <= 2
        assert len({f["earned_msat"] for f in figures.values()}) >= 2  # not all alike
        await ledger_ok(net)


async def test_price_feed_against_misbehaving_sources(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from quart import Response
    from quart_trio import QuartTrio

    from routecat.config import load_config
    from routecat.metrics import Metrics
    from routecat.money.rates import RateFeed

    answers: dict[str, Any] = {}
    app = QuartTrio("sources")

    @app.route("/<path:path>")
    async def source(path: str) -> Any:
        name = path.split("/")[0]
        answer = answers.get(name, ("json", {}))
        if answer[0] == "sleep":
            await trio.sleep(30)
        if answer[0] == "raw":
            return Response(answer[1], content_type="text/html")
        return answer[1]

    with trio.fail_after(30):
        url = await nursery.start(serve_app, app)
        config = load_config(
            flags={
                "rate_mode": "live",
                "rate_urls": f"coinbase={url}/coinbase,kraken={url}/kraken,bitstamp={url}/bitstamp,coingecko={url}/coingecko,mempool={url}/mempool",
            },
            environ={},
        )
        feed = RateFeed(config, Metrics(), Clock(), source_timeout=0.5)
        assert feed.rate is None and not feed.pinned
        answers.update(
            coinbase=("json", {"data": {"rates": {"USD": "0"}}}),
            kraken=("json", {"result": {"XXBTZUSD": {"c": ["NaN", "1"]}}}),
            bitstamp=("json", {"last": "not a number"}),
            coingecko=("raw", "<html>rate limited</html>"),
            mempool=("sleep", None),
        )
        async with httpx.AsyncClient() as client:
            assert await feed.refresh(client) is None
            # Deeply nested JSON (a RecursionError while parsing) and odd shapes: silence.
            answers.update(
                coingecko=("raw", "[" * 50_000 + "]" * 50_000),
                bitstamp=("json", [1, 2]),
            )
            assert await feed.refresh(client) is None
            assert feed.rate is None  # never priced at 0
            answers.update(
                coinbase=("json", {"data": {"rates": {"USD": "90000.50"}}}),
                kraken=("json", {"result": {"XXBTZUSD": {"c": ["91000.1", "1"]}}}),
                bitstamp=("json", {"last": -5}),
                mempool=("json", {"USD": 95000}),
            )
            assert await feed.refresh(client) == Decimal("91000.1")
            assert feed.answered == ["coinbase", "kraken", "mempool"]
            answers.clear()
            assert await feed.refresh(client) is None
            assert feed.rate == Decimal("91000.1")  # the last good rate stays


async def test_stale_rate_refuses_paid_keeps_free(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            btc_usd="",
            rate_mode="live",
            rate_urls="coinbase=http://127.0.0.1:9/none",
            rate_sources="coinbase",
            free_daily_requests="1",
        )
        gw = net.gateway.gw
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("x"))
            assert_error(r, 503, "pricing_unavailable")  # no rate ever known: nothing runs
            gw.rates.rate = Decimal("100000")
            gw.rates.fetched_at = gw.clock.wall() - 3600  # an hour old: stale
            r = await c.post("/v1/chat/completions", json=chat("x", max_tokens=2000))
            assert r.status_code == 200  # free requests may use the last known rate
            assert r.headers["X-RouteCat-Free"] == "1"
            r = await c.post("/v1/chat/completions", json=chat("x", max_tokens=2000))
            assert_error(r, 503, "pricing_unavailable")  # the free one is used: paid
            stats = (await c.get("/v1/stats")).json()
            assert stats["btc_usd_age_s"] >= 3600
            gw.rates.fetched_at = gw.clock.wall()
            assert (
                await c.post("/v1/chat/completions", json=chat("x", max_tokens=2000))
            ).status_code == 200


async def test_operator_cli_credit_check_history(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0, free_daily_requests="0"
        )
        db = net.gateway.config.database

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "routecat", *args, "--database", db],
                capture_output=True,
                text=True,
                timeout=60,
            )

        out = await trio.to_thread.run_sync(cli, "keys", "credit", net.key[:11], "--sats", "250")
        assert out.returncode == 0, out.stderr
        assert (await balance(net))["balance_sats"] == 250
        async with net.client() as c:
            assert (
                await c.post("/v1/chat/completions", json=chat("x", max_tokens=2000))
            ).status_code == 200
        out = await trio.to_thread.run_sync(cli, "ledger", "check")
        assert out.returncode == 0, out.stdout
        assert "ledger OK" in out.stdout and "sum of all postings: 0 msat" in out.stdout
        out = await trio.to_thread.run_sync(cli, "ledger", "history", "user:1")
        assert "credit" in out.stdout and "job" in out.stdout and "250000" in out.stdout
        # Tamper with a cached balance: the check must notice.
        await net.gateway.gw.store.write(
            lambda db: db.execute(
                "UPDATE accounts SET balance_msat = balance_msat + 1 WHERE id = 'user:1'"
            )
        )
        out = await trio.to_thread.run_sync(cli, "ledger", "check")
        assert out.returncode == 1 and "BROKEN user:1: balance" in out.stdout


async def test_sigkill_with_jobs_in_flight_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    db = database(tmp_path, "kill.db")

    def reservations(accounts: str = "%") -> tuple[int, int]:
        """Open reservations and the accounts' reserved sum, read beside the gateway."""
        store = reopen(db)
        try:
            return store.read_sync(
                lambda c: (
                    int(
                        c.execute(
                            "SELECT COUNT(*) FROM reservations WHERE account LIKE ?", (accounts,)
                        ).fetchone()[0]
                    ),
                    int(
                        c.execute(
                            "SELECT COALESCE(SUM(reserved_msat), 0) FROM accounts WHERE id LIKE ?",
                            (accounts,),
                        ).fetchone()[0]
                    ),
                )
            )
        finally:
            store.close()

    env = {
        **os.environ,
        "ROUTECAT_DATABASE": db,
        "ROUTECAT_PORT": "0",
        "ROUTECAT_CATALOG": catalog(tmp_path),
        "ROUTECAT_BTC_USD": "100000",
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000",
        "ROUTECAT_HEARTBEAT_INTERVAL": "0.5",
        "ROUTECAT_REPLICA_LIVENESS": "2",
        "ROUTECAT_SWEEP_INTERVAL": "0.5",
    }

    async def start() -> tuple[trio.Process, str]:
        with open(tmp_path / "gw.log", "ab") as log:  # a file: nobody has to drain it
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "routecat", "serve"], env=env, stderr=log
            )
        with trio.fail_after(20):
            while True:
                text = (tmp_path / "gw.log").read_text()
                if text.count("listening on") == starts + 1:
                    break
                await trio.sleep(0.05)
        return proc, text.rsplit("listening on ", 1)[1].split()[0]

    starts = 0
    with trio.fail_after(90):
        proc, url = await start()
        engine = await start_engine(nursery, Knobs(delay=0.2, repeat=20))
        await start_node(nursery, url, engine, max_jobs=100)
        async with httpx.AsyncClient(
            base_url=url, timeout=60, limits=httpx.Limits(max_connections=100)
        ) as c:
            key = (await c.post("/v1/auth/register", json={"name": "victim"})).json()["api_key"]
            c.headers["Authorization"] = f"Bearer {key}"
            await trio.run_process(
                [sys.executable, "-m", "routecat", "keys", "credit", key[:11], "--sats", "1000000"],
                env=env,
                capture_stdout=True,
            )
            completed: list[str] = []
            quick = {**chat("quick", max_tokens=2000)}
            for _ in range(5):
                engine.knobs.delay = 0
                r = await c.post("/v1/chat/completions", json=quick)
                completed.append(r.json()["id"])
            engine.knobs.delay = 0.2

            async def stream_forever() -> None:
                try:
                    async with c.stream(
                        "POST",
                        "/v1/chat/completions",
                        json=chat("slow", stream=True, max_tokens=2000),
                    ) as r:
                        async for _ in r.aiter_lines():
                            pass
                except httpx.HTTPError:
                    pass

            async with trio.open_nursery() as inner:
                for _ in range(50):
                    inner.start_soon(stream_forever)
                await wait_for(lambda: engine.active == 50, timeout=20)
                count, _ = await trio.to_thread.run_sync(reservations)
                paid = await trio.to_thread.run_sync(reservations, "user:%")
                # The free requests' reservations are rows; PostgreSQL (replicas) keeps
                # the paid ones in the database too, SQLite (one process) in memory.
                if db.startswith("postgres"):
                    assert count == 50 and paid[0] > 0 and paid[1] > 0
                else:
                    assert paid == (0, 0) and 0 < count < 50
                before = (await c.get("/v1/auth/balance")).json()["balance_msat"]
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        starts = 1
        proc, url = await start()
        try:
            check = await trio.run_process(
                [sys.executable, "-m", "routecat", "ledger", "check"],
                env=env,
                capture_stdout=True,
                check=False,
            )
            assert check.returncode == 0, check.stdout
            # SQLite: released at start (one process owns the file). PostgreSQL: the dead
            # process is another replica until it has been silent for replica_liveness.
            for _ in range(100):
                if await trio.to_thread.run_sync(reservations) == (0, 0):
                    break
                await trio.sleep(0.1)
            assert await trio.to_thread.run_sync(reservations) == (0, 0)
            async with httpx.AsyncClient(base_url=url) as c:
                audit = (await c.get("/v1/audit?per_page=100")).json()
                # The 50 killed jobs never settled: nothing billed for them, nothing lost.
                after = await c.get("/v1/auth/balance", headers={"Authorization": f"Bearer {key}"})
            assert set(completed) <= {j["id"] for j in audit["jobs"]}
            assert after.json()["balance_msat"] == before
        finally:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def test_client_leaving_while_queued_gets_everything_back(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            max_jobs=1,
            knobs=Knobs(first_delay=1.5),
            queue_timeout="10",
        )
        gw = net.gateway.gw
        async with net.client() as c, trio.open_nursery() as inner:
            inner.start_soon(
                functools.partial(c.post, "/v1/chat/completions", json=chat("occupies the node"))
            )
            await wait_for(lambda: net.engine.active == 1)
            # A second, free request waits in the queue; its client gives up.
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=chat("gives up"), timeout=0.4)
            await trio.sleep(0.3)
            reservations = await gw.store.read(
                lambda db: db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
            )
            assert reservations == 1  # only the running job's
            assert (await balance(net))["free_remaining"] == 9  # the queued request gave its back
        await wait_for(lambda: not gw.scheduler.jobs)
        assert (
            await gw.store.read(
                lambda db: db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
            )
        ) == 0
        await ledger_ok(net)


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_max_tokens_default_and_ceiling_are_apart(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """No max_tokens: the default (4,096) sizes the job and its reservation. A paid
    request may ask for more, up to the model's ceiling (here the context length its
    node reports), and gets the ceiling beyond it, said in a header, never cut to the
    default."""
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            backend=backend,
            catalog=catalog(tmp_path),
            free_daily_requests="0",
            knobs=Knobs(context_length=32768),
        )
        async with net.client() as c:
            models = (await c.get("/v1/models")).json()["data"]
            assert models[0]["context_length"] == 32768
            assert models[0]["max_output_tokens"] == 32768
            r = await c.post("/v1/chat/completions", json=chat("big", max_tokens=20000))
            assert r.status_code == 200, r.text
            assert "X-RouteCat-Max-Tokens" not in r.headers
            assert (
                net.engine.requests[-1].get("max_tokens", 0) == 20000
                or net.engine.requests[-1].get("options", {}).get("num_predict") == 20000
            )
            r = await c.post("/v1/chat/completions", json=chat("huge", max_tokens=100000))
            assert r.status_code == 200, r.text
            assert r.headers["X-RouteCat-Max-Tokens"] == "32768"
            r = await c.post("/v1/chat/completions", json=chat("none"))
            sent = net.engine.requests[-1]
            assert (
                sent.get("max_tokens", 0) == 4096
                or sent.get("options", {}).get("num_predict") == 4096
            )


async def test_usage_history_is_the_keys_own(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0)
        async with net.client() as c:
            ids = []
            for i in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"mine {i}"))
                ids.append(r.json()["id"])
            page = (await c.get("/v1/auth/usage?per_page=2")).json()
            assert page["total"] == 3 and page["page"] == 1 and page["per_page"] == 2
            assert [j["id"] for j in page["data"]] == ids[::-1][:2]  # newest first
            first = page["data"][0]
            assert first["free"] is True and first["model"] == MODEL and first["kind"] == "chat"
            assert first["cost_sats"] == first["cost_msat"] // 1000 and first["tokens_out"] > 0
            assert first["timestamp"].endswith("Z")
            rest = (await c.get("/v1/auth/usage?page=2&per_page=2")).json()
            assert [j["id"] for j in rest["data"]] == [ids[0]]
            assert_error(await c.get("/v1/auth/usage?page=0"), 400, "invalid_request")
            other = await register(c, "someone else")
        async with net.gateway.client(headers={"Authorization": f"Bearer {other}"}) as c:
            theirs = (await c.get("/v1/auth/usage")).json()
            assert theirs["total"] == 0 and theirs["data"] == []
        async with net.gateway.client() as c:
            assert_error(await c.get("/v1/auth/usage"), 401, "invalid_api_key")
