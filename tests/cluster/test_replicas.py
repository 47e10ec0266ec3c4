"""Replicas on one PostgreSQL database: forwarding, and money exactly once across them.

Runs in ``nox -s postgres`` (``ROUTECAT_TEST_POSTGRES``); the SQLite session skips it
with that reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tests.clients import MODEL, chat, read_sse, text_of, wait_for
from tests.fakes import Knobs, start_engine
from tests.servers import (
    Running,
    assert_error,
    catalog,
    fund,
    network_config,
    register,
    reopen,
    start_gateway,
    start_node,
)

pytestmark = pytest.mark.postgres_only

SECRET = "cluster-secret-for-tests-0123456789"


async def start_replicas(
    nursery: trio.Nursery, tmp_path: Path, n: int, **overrides: Any
) -> list[Running]:
    """``n`` gateways on one database, each with its own admin socket."""
    environ = {"ROUTECAT_CLUSTER_SECRET": SECRET}
    first = network_config(
        tmp_path,
        environ,
        cluster_interval="0.2",
        replica_liveness="2",
        admin_socket=str(tmp_path / "r0.sock"),
        **overrides,
    )
    replicas = [await start_gateway(nursery, first)]
    for i in range(1, n):
        config = network_config(
            tmp_path,
            environ,
            database=first.database,
            cluster_interval="0.2",
            replica_liveness="2",
            admin_socket=str(tmp_path / f"r{i}.sock"),
            **overrides,
        )
        replicas.append(await start_gateway(nursery, config))
    return replicas


async def sees_model(replica: Running, model: str = MODEL) -> bool:
    async with replica.client() as c:
        data = (await c.get("/v1/models")).json()["data"]
    return any(m["id"] == model for m in data)


async def ledger_ok(replica: Running) -> None:
    from ledger import book

    store = reopen(replica.config.database)
    try:
        result = await trio.to_thread.run_sync(lambda: store.read_sync(book.check))
    finally:
        store.close()
    assert result.ok, result.problems()


async def test_a_replica_without_nodes_forwards_to_the_one_that_has_them(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2, catalog=catalog(tmp_path))
        engine = await start_engine(nursery, Knobs(delay=0.05, repeat=3))
        node = await start_node(nursery, a.url, engine)
        # B lists A's node's model once the directory says so.
        for _ in range(100):
            if await sees_model(b):
                break
            await trio.sleep(0.1)
        assert await sees_model(b)
        async with b.client() as c:
            key = await register(c)
        await fund(b, key, 10_000)
        headers = {"Authorization": f"Bearer {key}"}
        async with b.client(headers=headers) as c:
            r = await c.post("/v1/chat/completions", json=chat("over there", max_tokens=2000))
            assert r.status_code == 200, r.text
            body = r.json()
            assert "over there" in body["choices"][0]["message"]["content"]
            async with c.stream(
                "POST", "/v1/chat/completions", json=chat("streamed", stream=True)
            ) as r:
                events, done, _ = await read_sse(r)
            assert done and "streamed" in text_of(events)
            # Billed once, on B (which admitted it), to A's node as the provider.
            audit = (await c.get("/v1/audit")).json()
        assert {j["id"] for j in audit["jobs"]} >= {body["id"]}
        earned = await b.gw.earnings.of(node.id)
        assert earned["earned_msat"] > 0
        assert b.gw.forwarder.forwarded == 2 and not a.gw.forwarder.forwarded
        await ledger_ok(a)


async def test_a_forwarded_stream_cancelled_by_its_client_stops_on_the_node(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2, catalog=catalog(tmp_path))
        engine = await start_engine(nursery, Knobs(delay=0.2, repeat=200))
        await start_node(nursery, a.url, engine)
        await wait_for(lambda: bool(b.gw.registry.remote), timeout=20)
        async with b.client() as c:
            key = await register(c)
        await fund(b, key, 10_000)
        async with (
            b.client(headers={"Authorization": f"Bearer {key}"}) as c,
            c.stream(
                "POST", "/v1/chat/completions", json=chat("long", stream=True, max_tokens=2000)
            ) as r,
        ):
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # one chunk, then the client leaves
        await wait_for(lambda: engine.active == 0, timeout=10)
        await wait_for(lambda: not any(n.in_flight for n in a.gw.registry.nodes.values()), 10)
        await wait_for(lambda: not b.gw.scheduler.jobs, timeout=10)
        await ledger_ok(a)


async def test_concurrent_requests_over_replicas_overdraw_at_most_one_request(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """200 concurrent paid requests against about one request of balance, spread over
    three replicas: admission is one serializable transaction on the shared database."""
    with trio.fail_after(120):
        # Three gateways, three nodes and 200 clients share one test process: slow
        # heartbeats, so that a busy event loop is not mistaken for a dead node.
        replicas = await start_replicas(
            nursery,
            tmp_path,
            3,
            catalog=catalog(tmp_path),
            free_daily_requests="0",
            heartbeat_interval="5",
        )
        engine = await start_engine(nursery, Knobs(delay=0.01))
        for r in replicas:
            await start_node(nursery, r.url, engine, max_jobs=100)
        async with replicas[0].client() as c:
            key = await register(c)
        await fund(replicas[0], key, 15)  # one request costs 11 sats: about one request
        statuses: list[int] = []

        async def one(i: int) -> None:
            replica = replicas[i % 3]
            async with replica.client(headers={"Authorization": f"Bearer {key}"}) as c:
                r = await c.post("/v1/chat/completions", json=chat("hi", max_tokens=2000))
            statuses.append(r.status_code)

        async with trio.open_nursery() as inner:
            for i in range(200):
                inner.start_soon(one, i)
        cost = 5 * 1000 + 3 * 2000  # "hi": 1+4 prompt tokens, "You said: hi": 3 tokens
        assert statuses.count(200) + statuses.count(402) == 200, sorted(set(statuses))
        assert 1 <= statuses.count(200) <= 2
        async with replicas[1].client(headers={"Authorization": f"Bearer {key}"}) as c:
            final = (await c.get("/v1/auth/balance")).json()["balance_msat"]
        assert final == 15_000 - statuses.count(200) * cost
        assert final >= -cost  # the overdraft is bounded by one admitted request
        await ledger_ok(replicas[2])


async def test_rate_limit_and_free_tier_are_global(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(60):
        a, b = await start_replicas(
            nursery,
            tmp_path,
            2,
            catalog=catalog(tmp_path),
            rate_limit_per_minute="4",
            free_daily_requests="3",
        )
        engine = await start_engine(nursery, Knobs())
        await start_node(nursery, a.url, engine)
        await start_node(nursery, b.url, engine)
        async with a.client() as c:
            key = await register(c)
        headers = {"Authorization": f"Bearer {key}"}
        async with a.client(headers=headers) as ca, b.client(headers=headers) as cb:
            statuses = []
            for c in (ca, cb, ca):  # three free requests, on two replicas
                r = await c.post("/v1/chat/completions", json=chat("free", max_tokens=10))
                statuses.append(r.status_code)
                assert r.headers.get("X-RouteCat-Free") == "1"
            assert statuses == [200, 200, 200]
            r = await cb.post("/v1/chat/completions", json=chat("fourth", max_tokens=10))
            assert_error(r, 402, "insufficient_balance")  # the day's free requests are used
            r = await ca.post("/v1/chat/completions", json=chat("fifth", max_tokens=10))
            assert_error(r, 429, "rate_limit_exceeded")  # 4 per minute, whichever replica
            assert 1 <= int(r.headers["Retry-After"]) <= 60


async def test_one_payout_worker_at_a_time(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        a, b = await start_replicas(nursery, tmp_path, 2, payout_interval="3600")
        assert await a.gw.payouts.lease()
        assert not await b.gw.payouts.lease()  # A holds it
        assert await a.gw.payouts.lease()  # renewed by its holder
        a.gw.clock.wall = lambda: 10**10  # A's lease long expired, from B's point of view
        b.gw.clock.wall = lambda: 10**10 + 1
        assert await b.gw.payouts.lease()
        assert not await a.gw.payouts.lease()


async def test_a_dead_replicas_reservations_are_released_by_a_live_one(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from ledger import book

    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2, sweep_interval="0.5")
        store = reopen(a.config.database)
        try:
            # A reservation held by a replica that never beats again (it died).
            await trio.to_thread.run_sync(
                lambda: store.write_sync(
                    lambda db: book.reserve_unconditionally(
                        db, "job:orphan", book.SUBSIDY, 5000, 0.0, "r_dead"
                    )
                )
            )
            # One held by B, alive: A's sweeper must leave it alone.
            await trio.to_thread.run_sync(
                lambda: store.write_sync(
                    lambda db: book.reserve_unconditionally(
                        db, "job:alive", book.SUBSIDY, 7000, 0.0, b.gw.cluster.id
                    )
                )
            )
            b.gw.admissions.open_reservations.add("job:alive")

            def left() -> list[str]:
                return store.read_sync(
                    lambda db: [r[0] for r in db.execute("SELECT id FROM reservations")]
                )

            for _ in range(100):
                if await trio.to_thread.run_sync(left) == ["job:alive"]:
                    break
                await trio.sleep(0.1)
            assert await trio.to_thread.run_sync(left) == ["job:alive"]
        finally:
            store.close()
