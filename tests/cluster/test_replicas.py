"""Replicas on one PostgreSQL database: forwarding, and money exactly once across them.

Runs in ``nox -s postgres`` (``ROUTECAT_TEST_POSTGRES``); the SQLite session skips it
with that reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
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
    start_relay,
)

pytestmark = pytest.mark.postgres_only

SECRET = "cluster-secret-for-tests-0123456789"


async def start_replicas(
    nursery: trio.Nursery,
    tmp_path: Path,
    n: int,
    first_only: dict[str, str] | None = None,
    **overrides: Any,
) -> list[Running]:
    """``n`` gateways on one database, each with its own admin socket (``first_only``:
    settings of the first one alone)."""
    environ = {"ROUTECAT_CLUSTER_SECRET": SECRET}
    first = network_config(
        tmp_path,
        environ,
        cluster_interval="0.2",
        replica_liveness="2",
        admin_socket=str(tmp_path / "r0.sock"),
        **{**overrides, **(first_only or {})},
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


async def test_forwarded_jobs_share_one_connection_between_replicas(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """B reads each forwarded job's stream to its end, so its jobs to A go over one
    connection instead of one each (A is reached through a relay that counts them)."""
    with trio.fail_after(60):
        proxy = await start_relay(nursery)
        a, b = await start_replicas(
            nursery, tmp_path, 2, {"advertise_url": proxy.url}, catalog=catalog(tmp_path)
        )
        host, port = a.url.split("//")[1].rsplit(":", 1)
        proxy.target = (host, int(port))
        engine = await start_engine(nursery)
        await start_node(nursery, a.url, engine)
        for _ in range(100):
            if await sees_model(b):
                break
            await trio.sleep(0.1)
        async with b.client() as c:
            key = await register(c)
        await fund(b, key, 10_000)
        async with b.client(headers={"Authorization": f"Bearer {key}"}) as c:
            for n in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"ask {n}"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"You said: ask {n}"
            async with c.stream(
                "POST", "/v1/chat/completions", json=chat("streamed", stream=True)
            ) as s:
                events, done, _ = await read_sse(s)
            assert done and text_of(events) == "You said: streamed"
    assert b.gw.forwarder.forwarded == 4 and not a.gw.forwarder.forwarded
    assert proxy.accepted == 1
    # Nothing of the finished jobs is kept on B's side of the link.
    (link,) = b.gw.registry.remote.values()
    assert not link._jobs and not link.attempts


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


async def test_sigkill_one_replica_with_streams_in_flight(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """DESIGN section 3's crash row across replicas: A dies with streams in flight; they
    end, nothing is billed for them, their free requests come back, B's sweeper releases
    A's reservations, and the node fails over to B and serves again."""
    import os
    import signal
    import sys

    from tests.servers import database

    db = database(tmp_path)
    base = {
        **os.environ,
        "ROUTECAT_DATABASE": db,
        "ROUTECAT_PORT": "0",
        "ROUTECAT_CATALOG": catalog(tmp_path),
        "ROUTECAT_BTC_USD": "100000",
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000",
        "ROUTECAT_HEARTBEAT_INTERVAL": "0.5",
        "ROUTECAT_CLUSTER_SECRET": SECRET,
        "ROUTECAT_CLUSTER_INTERVAL": "0.2",
        "ROUTECAT_REPLICA_LIVENESS": "2",
        "ROUTECAT_SWEEP_INTERVAL": "0.5",
        "ROUTECAT_FREE_DAILY_REQUESTS": "20",
        "ROUTECAT_FREE_DAILY_BUDGET_SATS": "100000000",
    }

    async def start(name: str) -> tuple[trio.Process, str]:
        env = {**base, "ROUTECAT_ADMIN_SOCKET": str(tmp_path / f"{name}.sock")}
        log = tmp_path / f"{name}.log"
        with open(log, "ab") as out:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "routecat", "serve"], env=env, stderr=out
            )
        with trio.fail_after(20):
            while "listening on " not in log.read_text():
                await trio.sleep(0.05)
        return proc, log.read_text().rsplit("listening on ", 1)[1].split()[0]

    def reservations() -> int:
        store = reopen(db)
        try:
            return int(
                store.read_sync(
                    lambda c: c.execute("SELECT COUNT(*) FROM reservations").fetchone()[0]
                )
            )
        finally:
            store.close()

    a, url_a = await start("a")
    b, url_b = await start("b")
    try:
        with trio.fail_after(90):
            engine = await start_engine(nursery, Knobs(delay=0.2, repeat=30))
            node = await start_node(nursery, f"{url_a},{url_b}", engine, max_jobs=20)
            async with httpx.AsyncClient(base_url=url_a, timeout=30) as c:
                key = (await c.post("/v1/auth/register", json={"name": "k"})).json()["api_key"]
                c.headers["Authorization"] = f"Bearer {key}"
                engine.knobs.delay = 0
                done = [
                    (await c.post("/v1/chat/completions", json=chat(f"q{i}"))).json()["id"]
                    for i in range(2)
                ]
                engine.knobs.delay = 0.2
                ended = 0

                async def stream() -> None:
                    nonlocal ended
                    try:
                        async with c.stream(
                            "POST", "/v1/chat/completions", json=chat("slow", stream=True)
                        ) as r:
                            async for _ in r.aiter_lines():
                                pass
                    except httpx.HTTPError:
                        pass
                    ended += 1

                async with trio.open_nursery() as inner:
                    for _ in range(6):
                        inner.start_soon(stream)
                    await wait_for(lambda: engine.active == 6, timeout=20)
                    assert await trio.to_thread.run_sync(reservations) == 6
                    a.send_signal(signal.SIGKILL)
                    await a.wait()
                # Every stream ended (the inner nursery returned) without waiting them out.
                assert ended == 6
            # The node moves to B; B's sweeper releases the dead replica's reservations.
            await wait_for(lambda: node.agent.connected and node.agent.current_gateway == url_b, 20)
            for _ in range(100):
                if await trio.to_thread.run_sync(reservations) == 0:
                    break
                await trio.sleep(0.1)
            assert await trio.to_thread.run_sync(reservations) == 0
            async with httpx.AsyncClient(
                base_url=url_b, timeout=30, headers={"Authorization": f"Bearer {key}"}
            ) as c:
                balance = (await c.get("/v1/auth/balance")).json()
                assert balance["free_remaining"] == 18  # the 6 unfinished came back
                engine.knobs.delay = 0
                r = await c.post("/v1/chat/completions", json=chat("after"))
                assert r.status_code == 200, r.text
                audit = {j["id"] for j in (await c.get("/v1/audit")).json()["jobs"]}
            assert set(done) | {r.json()["id"]} == audit  # nothing else billed
            check = await trio.run_process(
                [sys.executable, "-m", "routecat", "ledger", "check", "--database", db],
                capture_stdout=True,
                check=False,
            )
            assert check.returncode == 0, check.stdout
    finally:
        for proc in (a, b):
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()


async def test_db_copy_moves_a_sqlite_install_and_both_ledgers_check(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.servers import database, start_network

    old = str(tmp_path / "old.db")
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path), database=old)
        async with net.client() as c:
            for i in range(3):
                assert (await c.post("/v1/chat/completions", json=chat(f"j{i}"))).status_code == 200
            before = (await c.get("/v1/auth/balance")).json()
            audit = (await c.get("/v1/audit")).json()
        net.gateway.stop.set()
        await wait_for(lambda: not net.gateway.gw.ready, timeout=10)
        await trio.sleep(0.5)
        target = database(tmp_path)
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "routecat", "db", "copy", f"sqlite:///{old}", target],
                capture_output=True,
                text=True,
            )
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count(": OK") == 2 and "jobs" in out.stdout
        # A second copy into the same target is refused: histories are never merged.
        again = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "routecat", "db", "copy", f"sqlite:///{old}", target],
                capture_output=True,
                text=True,
            )
        )
        assert again.returncode == 1 and "already holds" in again.stderr
        moved = await start_gateway(nursery, network_config(tmp_path, database=target))
        async with moved.client(headers={"Authorization": f"Bearer {net.key}"}) as c:
            assert (await c.get("/v1/auth/balance")).json() == before
            assert (await c.get("/v1/audit")).json() == audit
            # New ids continue after the copied ones.
            key = (await c.post("/v1/auth/register", json={"name": "new"})).json()["api_key"]
        assert key
        await ledger_ok(moved)


async def test_nodes_list_shows_every_replicas_nodes(nursery: trio.Nursery, tmp_path: Path) -> None:
    import subprocess
    import sys

    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2)
        engine = await start_engine(nursery, Knobs())
        one = await start_node(nursery, a.url, engine)
        two = await start_node(nursery, b.url, engine)
        await wait_for(lambda: len(a.gw.registry.remote) == 1, timeout=20)
        out = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "routecat",
                    "nodes",
                    "list",
                    "--database",
                    a.config.database,
                ],
                capture_output=True,
                text=True,
            )
        )
        assert out.returncode == 0, out.stderr
        assert "2 nodes online on 2 replicas" in out.stdout
        assert one.id in out.stdout and two.id in out.stdout
        assert a.gw.cluster.id in out.stdout and b.gw.cluster.id in out.stdout


async def test_a_topup_paid_while_its_replica_is_down_is_credited_once_by_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from routecat.clock import Clock
    from routecat.money.lightning.devwallet import DevWallet
    from tests.clients import topup

    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2)
        async with a.client() as c:
            key = await register(c)
            c.headers["Authorization"] = f"Bearer {key}"
            body = await topup(c, 300)
        a.stop.set()
        await wait_for(lambda: not a.gw.ready, timeout=10)
        # The payer pays while A (which issued the invoice) is down: the dev wallet's
        # state is in the shared database.
        store = reopen(a.config.database)
        try:
            await DevWallet(store, Clock()).settle_own(body["invoice"])
        finally:
            store.close()
        b.gw.topups.wake()
        await wait_for(lambda: b.gw.topups.credited == 1, timeout=15)
        # A comes back and reconciles too: still credited once.
        again = await start_gateway(nursery, a.config)
        await again.gw.topups.reconcile(expired_too=True)
        assert again.gw.topups.credited == 0
        async with b.client(headers={"Authorization": f"Bearer {key}"}) as c:
            assert (await c.get("/v1/auth/balance")).json()["balance_sats"] == 300
            status = (await c.get(f"/v1/auth/topup/{body['payment_hash']}")).json()
        assert status["status"] == "paid"
        await ledger_ok(b)


async def test_concurrent_payout_workers_pay_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    from tests.servers import earn

    with trio.fail_after(90):
        net, lnurl = await earn(
            nursery, tmp_path, payout_interval="3600", admin_socket=str(tmp_path / "a.sock")
        )
        a = net.gateway
        b = await start_gateway(
            nursery,
            network_config(
                tmp_path,
                database=a.config.database,
                lnurl_base_url_override=lnurl.url,
                payout_interval="3600",
                payout_threshold_sats="100",
                admin_socket=str(tmp_path / "b.sock"),
            ),
        )
        node_id = net.nodes[0].id
        payable = (await a.gw.earnings.of(node_id))["payable_msat"]
        assert payable >= 100_000
        async with trio.open_nursery() as inner:  # both replicas' workers at once
            inner.start_soon(a.gw.payouts.cycle)
            inner.start_soon(b.gw.payouts.cycle)
        await b.gw.payouts.cycle()  # and again, one after the other: nothing more is due
        await a.gw.payouts.cycle()
        paid = [p for p in await a.gw.payouts.list() if p.state == "paid"]
        assert len(paid) == 1 and len(lnurl.invoices) == 1
        after = await b.gw.earnings.of(node_id)
        assert after["paid_msat"] == paid[0].amount_msat == payable // 1000 * 1000
        await ledger_ok(a)


async def test_the_openai_sdk_through_every_replica(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Three replicas, nodes on two of them: the official SDK gets the same answers,
    streams and tool calls through each (the third forwards everything)."""
    import json

    import openai

    with trio.fail_after(90):
        replicas = await start_replicas(nursery, tmp_path, 3, catalog=catalog(tmp_path))
        plain = await start_engine(nursery, Knobs())
        tools_engine = await start_engine(
            nursery,
            Knobs(
                models=["tools:1b"],
                reply=[],
                tool_call={"name": "get_weather", "arguments": {"city": "Paris"}},
            ),
        )
        await start_node(nursery, replicas[0].url, plain)
        await start_node(nursery, replicas[1].url, tools_engine)
        for r in replicas:
            await wait_for(lambda r=r: len(r.gw.registry.online_models()) == 2, timeout=20)
        async with replicas[0].client() as c:
            key = await register(c)
        await fund(replicas[0], key, 100_000)
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
        for replica in replicas:
            client = openai.AsyncOpenAI(base_url=replica.url + "/v1", api_key=key, max_retries=0)
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=50
            )
            assert r.choices[0].message.content == "You said: hello there"
            assert r.usage is not None and r.usage.completion_tokens == 4
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "stream me please"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [c async for c in stream]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "You said: stream me please"
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
            t = await client.chat.completions.create(
                model="tools:1b",
                messages=[{"role": "user", "content": "weather in Paris?"}],
                tools=tools,  # type: ignore[list-item]
            )
            call = t.choices[0].message.tool_calls[0]  # type: ignore[index]
            assert t.choices[0].finish_reason == "tool_calls"
            assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
            await client.close()
        assert replicas[2].gw.forwarder.forwarded == 3  # everything it served went elsewhere
        assert replicas[0].gw.forwarder.forwarded == 1  # its tool call: on replica 1's node
        await ledger_ok(replicas[0])


async def test_replicas_starting_at_once_migrate_once(tmp_path: Path) -> None:
    """Migrations of replicas starting together: one advisory lock, each step once."""
    from ledger.postgres import PostgresStore
    from routecat.db.schema import open_store
    from tests.servers import database

    url = database(tmp_path)
    stores: list[Any] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(open_store(url))
        except BaseException as exc:
            errors.append(exc)
            raise

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(trio.to_thread.run_sync, start)
    assert errors == [] and len(stores) == 4
    store = stores[0]
    assert isinstance(store, PostgresStore)
    steps = store.read_sync(
        lambda db: [
            tuple(r)
            for r in db.execute(
                "SELECT component, version FROM schema_migrations ORDER BY component, version"
            )
        ]
    )
    assert len(steps) == len(set(steps))  # each step recorded once
    assert ("ledger", 2) in steps and ("routecat", 5) in steps
    for s in stores:
        s.close()


async def test_a_forwarded_job_fails_over_before_its_first_token(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """B holds no node; the node on A is killed while the job waits for its first
    token: the job moves to the node on C, and is billed once."""
    with trio.fail_after(60):
        a, b, c_ = await start_replicas(nursery, tmp_path, 3, catalog=catalog(tmp_path))
        engine = await start_engine(nursery, Knobs(first_delay=0.5))
        on_a = await start_node(nursery, a.url, engine, max_jobs=1)
        on_c = await start_node(nursery, c_.url, engine, max_jobs=1)
        await wait_for(lambda: len(b.gw.registry.remote) == 2, timeout=20)
        async with b.client() as c:
            key = await register(c)
        await fund(b, key, 10_000)
        results: list[httpx.Response] = []
        async with b.client(headers={"Authorization": f"Bearer {key}"}) as c:
            async with trio.open_nursery() as inner:

                async def ask() -> None:
                    results.append(await c.post("/v1/chat/completions", json=chat("fail over")))

                inner.start_soon(ask)
                nodes = (on_a, on_c)
                await wait_for(lambda: any(n.agent.statistics()["in_flight"] for n in nodes))
                busy = next(n for n in nodes if n.agent.statistics()["in_flight"])
                await busy.kill()
            audit = (await c.get("/v1/audit")).json()
        r = results[0]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "You said: fail over"
        assert [j["id"] for j in audit["jobs"]] == [r.json()["id"]]  # billed once
        await ledger_ok(b)


async def test_embeddings_and_responses_through_forwarding(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    import openai

    embed = "nomic-embed-text:v1.5"
    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2, catalog=catalog(tmp_path))
        engine = await start_engine(nursery, Knobs(models=[MODEL, embed]))
        await start_node(nursery, a.url, engine)
        await wait_for(lambda: len(b.gw.registry.online_models()) == 2, timeout=20)
        async with b.client() as c:
            key = await register(c)
            kinds = {
                m["id"]: m["routecat_kind"] for m in (await c.get("/v1/models")).json()["data"]
            }
        assert kinds == {MODEL: "chat", embed: "embedding"}  # B knows A's node's models
        await fund(b, key, 10_000)
        client = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key=key, max_retries=0)
        e = await client.embeddings.create(model=embed, input=["one", "two"])
        assert [len(d.embedding) for d in e.data] == [8, 8]
        r = await client.responses.create(model=MODEL, input="over there")
        assert r.output_text == "You said: over there"
        await client.close()
        assert b.gw.forwarder.forwarded == 2
        await ledger_ok(b)


async def test_a_stock_agent_registered_at_one_replica_serves_through_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Behind a load balancer a stock agent registers at one replica, holds its socket
    at another and fetches its jobs from either: each fetch reaches the request (kept in
    the memory of the replica with the socket) once, for that agent's key only."""
    from tests.stock_agent import StockAgent

    with trio.fail_after(60):
        a, b = await start_replicas(nursery, tmp_path, 2, owlrun_compat="true")
        engine = await start_engine(nursery, Knobs())
        agent = StockAgent(b.url, engine.url, [MODEL], register_at=a.url, fetch_at=a.url)
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in b.gw.registry.nodes, timeout=10)
        await wait_for(lambda: agent.node_id in a.gw.registry.remote, timeout=10)
        for replica in (b, a):  # a client at the socket's replica, then at the other
            async with replica.client() as c:
                key = await register(c)
                r = await c.post(
                    "/v1/chat/completions",
                    json=chat("hello there"),
                    headers={"Authorization": f"Bearer {key}"},
                )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "You said: hello there"
        assert len(agent.fetched) == 2 and a.gw.forwarder.forwarded == 1
        # The fetch is served once: again, through either replica, it is gone.
        job_id = agent.jobs[-1]
        async with httpx.AsyncClient() as c:
            for replica in (a, b):
                again = await c.get(
                    f"{replica.url}/v1/gateway/jobs/{job_id}/proxy/request",
                    headers={"Authorization": f"Bearer {agent.key}"},
                )
                assert again.status_code == 404
            # The internal route is another replica's only: without the secret, unknown.
            forged = await c.get(
                f"{b.url}/internal/v1/stock/jobs/{job_id}",
                headers={"X-RouteCat-Provider-Key-Hash": "0" * 64},
            )
            assert forged.status_code == 404
        await ledger_ok(a)
