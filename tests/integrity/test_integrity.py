"""Integrity: no node, client or remote server can mint money, crash the gateway, or
hurt another user's job. Each test here reproduces an attack or an ordinary failure
that broke an invariant before, against a live gateway over real sockets."""

from __future__ import annotations

import functools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trio_websocket

from ledger import book
from ledger.errors import WrongDirection
from owlrun.agent import open_gateway_socket
from routecat.money.lightning.errors import LnurlError
from routecat.money.lightning.lnurl import parse_address
from tests.clients import MODEL, chat, read_sse, text_of, wait_for
from tests.fakes import Knobs
from tests.rogue import ROGUE_MODEL, rogue_node
from tests.servers import (
    assert_error,
    balance,
    catalog,
    ledger_ok,
    open_test_store,
    register,
    reopen,
    start_gateway,
    start_network,
)


async def count(net: Any, sql: str, *params: Any) -> Any:
    return await net.gateway.gw.store.read(lambda db: db.execute(sql, params).fetchone()[0])


async def ask_rogue(net: Any, rogue: Any, answer: str, usage: Any) -> httpx.Response:
    """A client's chat request that the rogue node answers with ``answer`` and ``usage``."""
    responses: list[httpx.Response] = []
    async with net.client() as c, trio.open_nursery() as inner:

        async def ask() -> None:
            body = {**chat("hello there"), "model": ROGUE_MODEL}
            responses.append(await c.post("/v1/chat/completions", json=body))

        inner.start_soon(ask)
        job = await rogue.next_job()
        await rogue.answer(job.job_id, answer, usage)
    (response,) = responses
    return response


# -- 1. a node cannot mint money -------------------------------------------------------


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1_000_000_000, "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": -3},
        {"prompt_tokens": 2**31 + 1, "completion_tokens": 1},
        {"prompt_tokens": 3.5, "completion_tokens": 1},
        {"prompt_tokens": "12", "completion_tokens": 1},
        {"prompt_tokens": True, "completion_tokens": 1},
        "lots",
    ],
)
async def test_invalid_usage_is_billed_as_unreported(
    nursery: trio.Nursery, tmp_path: Path, usage: Any
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=0, free_daily_requests="0")
        gw = net.gateway.gw
        before = (await balance(net))["balance_msat"]
        async with rogue_node(net.url) as rogue:
            r = await ask_rogue(net, rogue, "hi!", usage)
        assert r.status_code == 200, r.text
        billed = r.json()["usage"]
        # Billed as if nothing was reported: estimates, never the node's numbers.
        assert billed["prompt_tokens"] >= 0 and billed["completion_tokens"] == 1  # ceil(3 / 4)
        after = (await balance(net))["balance_msat"]
        assert after == before - billed["cost_msat"] and billed["cost_msat"] > 0
        assert gw.reputation.penalties[rogue.node_id] == 1
        async with net.gateway.client() as c:
            assert (await c.get("/healthz")).status_code == 200
        await ledger_ok(net)


def test_ledger_refuses_and_check_catches_a_negative_cost(tmp_path: Path) -> None:
    store = open_test_store(tmp_path, "l.db")
    where = store.path
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    with pytest.raises(WrongDirection):
        store.write_sync(lambda db: book.post_job(db, "job:x", "user:1", "provider:n", -5))
    with pytest.raises(WrongDirection):
        store.write_sync(lambda db: book.post_job(db, "job:y", "provider:n", "user:1", 5))
    assert store.read_sync(book.check).ok
    # The state a negative bill produced before: balanced, so the zero sum alone was OK.
    store.write_sync(
        lambda db: book.post(
            db,
            "job:minted",
            "job",
            [
                book.Posting("user:1", 100_000_000),
                book.Posting("provider:n", -95_000_000),
                book.Posting(book.OPERATOR_FEE, -5_000_000),
            ],
        )
    )
    result = store.read_sync(book.check)
    assert result.total_msat == 0
    assert not result.ok
    problems = "\n".join(result.problems())
    assert "provider:n" in problems and "operator:fee" in problems
    assert "not paid by exactly one user or the subsidy" in problems
    store.close()
    out = subprocess.run(
        [sys.executable, "-m", "routecat", "ledger", "check", "--database", where],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "ledger BROKEN" in out.stdout and "BROKEN provider:n" in out.stdout


# -- 2. a payout address cannot crash the gateway --------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "x@example.com:99999",
        "x@example.com:443",
        "x@127.0.0.1",
        "x@localhost",
        "x@exa mple.com",
        "x@@example.com",
        "X" * 70 + "@example.com",
        "x@-bad-.com",
    ],
)
def test_lightning_addresses_are_strict(address: str) -> None:
    with pytest.raises(LnurlError):
        parse_address(address)


def test_good_lightning_address() -> None:
    assert parse_address("Alice.B+tip@Pay.Example.COM") == ("alice.b+tip", "pay.example.com")


async def test_payout_address_with_port_refused_at_hello(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        gateway = await start_gateway(nursery, _config(tmp_path))
        async with rogue_node(gateway.url, payout_address="x@example.com:99999") as rogue:
            assert rogue.reply["type"] == "refused"
            assert "not a Lightning Address" in rogue.reply["reason"]
            assert "no port" in rogue.reply["reason"]


async def test_long_non_ascii_refusal_is_clean(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(20):
        gateway = await start_gateway(nursery, _config(tmp_path))
        async with rogue_node(gateway.url, payout_address="é" * 100 + "@example.com") as rogue:
            assert rogue.reply["type"] == "refused"
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


@pytest.mark.parametrize(
    "fields",
    [{"name": "evil\x1b[2J"}, {"agent_version": "1.0\n"}, {"name": "x" * 65}],
)
async def test_hello_text_must_be_printable(
    nursery: trio.Nursery, tmp_path: Path, fields: dict[str, str]
) -> None:
    with trio.fail_after(20):
        gateway = await start_gateway(nursery, _config(tmp_path))
        async with rogue_node(gateway.url, **fields) as rogue:
            assert rogue.reply["type"] == "refused"
            assert "printable text" in rogue.reply["reason"]


def _config(tmp_path: Path, **overrides: Any) -> Any:
    from tests.servers import network_config

    return network_config(tmp_path, **overrides)


async def test_stored_bad_address_cannot_stop_the_gateway(tmp_path: Path) -> None:
    """A row stored before the address rules were strict: the gateway starts, serves,
    and holds that provider's payout with its reason."""
    config = _config(tmp_path, payout_interval="0.2", payout_threshold_sats="100")
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            gateway = await start_gateway(nursery, config)
            gateway.stop.set()
        store = reopen(config.database)

        def plant(db: Any) -> None:
            db.execute(
                "INSERT INTO nodes (id, secret_hash, payout_address, created_at, last_seen_at)"
                " VALUES ('old_node', 'x', 'x@example.com:99999', '', '')"
            )
            book.post(
                db,
                "seed",
                "credit",
                [
                    book.Posting("provider:old_node", 500_000),
                    book.Posting(book.OPERATOR_EQUITY, -500_000),
                ],
            )

        store.write_sync(plant)
        store.close()
        async with trio.open_nursery() as nursery:
            gateway = await start_gateway(nursery, config)
            gw = gateway.gw
            async with gateway.client() as c:  # a customer's top-up funds the dev wallet
                key = await register(c)
                r = await c.post(
                    "/v1/auth/topup",
                    json={"amount_sats": 5000},
                    headers={"Authorization": f"Bearer {key}"},
                )
                await gw.lightning.settle_own(r.json()["invoice"])  # type: ignore[attr-defined]
            await wait_for(lambda: gw.metrics.payout_failures.labels("resolve")._value.get() >= 1)
            async with gateway.client() as c:
                assert (await c.get("/healthz")).status_code == 200
                assert (await c.post("/v1/auth/register", json={"name": "x"})).status_code == 200
            (hold,) = await gw.payouts.holds()
            assert hold.node_id == "old_node" and "no port" in hold.reason
            out = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "routecat",
                    "payouts",
                    "list",
                    "--database",
                    config.database,
                ],
                capture_stdout=True,
            )
            assert b"old_node: LnurlError" in out.stdout and b"no port" in out.stdout
            gateway.stop.set()


# -- 3. one client's disconnect never hurts another job ---------------------------------


async def test_late_frames_after_cancel_are_dropped_quietly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=0)
        gw = net.gateway.gw
        async with rogue_node(net.url) as rogue, net.client() as c, trio.open_nursery() as inner:
            other: list[httpx.Response] = []

            async def patient() -> None:
                body = {**chat("long job"), "model": ROGUE_MODEL}
                other.append(await c.post("/v1/chat/completions", json=body))

            async def leaves() -> None:
                body = {**chat("short"), "model": ROGUE_MODEL, "stream": True}
                async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        return  # the client goes away after the first line

            inner.start_soon(patient)
            first = await rogue.next_job()
            inner.start_soon(leaves)
            second = await rogue.next_job()
            await rogue.send({"type": "chunk", "job_id": second.job_id, "delta": {"content": "a"}})
            while True:  # the gateway cancels the job whose client left
                message = await rogue.next_message()
                if message.type == "cancel":
                    break
            # Frames the node had already queued still arrive, done included.
            for word in ("b", "c", "d"):
                await rogue.send(
                    {"type": "chunk", "job_id": second.job_id, "delta": {"content": word}}
                )
            await rogue.send({"type": "done", "job_id": second.job_id, "finish_reason": "stop"})
            await rogue.send({"type": "cancelled", "job_id": second.job_id})
            await trio.sleep(0.2)
            assert not rogue.closed
            await rogue.answer(first.job_id, "fine", {"prompt_tokens": 3, "completion_tokens": 1})
            await wait_for(lambda: bool(other))
            assert other[0].status_code == 200, other[0].text
            assert other[0].json()["choices"][0]["message"]["content"] == "fine"
            assert gw.reputation.penalties.get(rogue.node_id, 0) == 0
            assert gw.registry.nodes[rogue.node_id].cooldown_until == 0
            # A frame for a job the node was never given is still hostile.
            await rogue.send({"type": "chunk", "job_id": "chatcmpl-never", "delta": {}})
            await wait_for(lambda: rogue.node_id not in gw.registry.nodes)


async def test_load_client_stopping_never_drops_the_node(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The load test that failed 178 of 1,802 requests: streams whose clients stop at
    random points while a fast engine is still sending."""
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path, knobs=Knobs(repeat=40), max_jobs=8)
        gw = net.gateway.gw
        node_id = net.nodes[0].id
        failures: list[str] = []
        async with net.client() as c:

            async def one(i: int) -> None:
                body = chat(f"words for stream {i}", stream=i % 2 == 0)
                if i % 3 == 0:
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for _ in r.aiter_bytes():
                            break
                    return
                r = await c.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    failures.append(r.text)

            for batch in range(10):
                async with trio.open_nursery() as inner:
                    for i in range(8):
                        inner.start_soon(one, batch * 8 + i)
        assert failures == []
        assert gw.registry.nodes[node_id].closed_reason is None
        assert net.nodes[0].agent.sessions == 1  # never reconnected
        await wait_for(lambda: not gw.scheduler.jobs)
        await ledger_ok(net)


# -- 4. a client that leaves before the response starts is cancelled --------------------


@pytest.mark.parametrize("stream", [True, False])
async def test_client_gone_before_response_start_is_cancelled(
    nursery: trio.Nursery, tmp_path: Path, stream: bool
) -> None:
    """A stream's job runs in the scheduler's task, a whole answer's in the request's:
    either way, a client that leaves cancels it, with the outcome ``client_gone``."""
    with trio.fail_after(60):
        net = await start_network(
            nursery, tmp_path, knobs=Knobs(delay=0.05, repeat=10), max_jobs=64
        )
        host, port = net.url.removeprefix("http://").split(":")
        body = json.dumps(chat("leave me", stream=stream)).encode()
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {net.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        for i in range(40):
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(request)
            await trio.sleep(i % 5 / 1000)  # 0-4 ms
            await stream.aclose()
        left = time.monotonic()
        await wait_for(lambda: not net.gateway.gw.scheduler.jobs, timeout=3)
        await wait_for(lambda: net.engine.active == 0, timeout=3)
        assert time.monotonic() - left < 1.5
        assert net.engine.finished == 0  # nothing ran to completion on the engine
        # Billed by the rules: nothing beyond the prompt and what was delivered.
        rows = await net.gateway.gw.store.read(
            lambda db: db.execute("SELECT outcome, tokens_out FROM jobs").fetchall()
        )
        assert all(r["outcome"] == "client_gone" for r in rows)
        assert sum(r["tokens_out"] for r in rows) < 40 * 20
        await ledger_ok(net)


# -- 5. a cancelled admission commits nothing -------------------------------------------


@pytest.mark.sqlite_only
async def test_cancelled_write_never_commits(tmp_path: Path) -> None:
    store = open_test_store(tmp_path, "w.db")
    store.migrate(book.COMPONENT, book.MIGRATIONS)

    def slow(db: Any) -> None:
        time.sleep(0.3)
        book.post(db, "slow", "credit", [book.Posting("user:1", 1), book.Posting("x:y", -1)])

    def reserve(db: Any) -> bool:
        return book.reserve(db, "job:cancelled", "user:1", 1, 0.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, slow)
        await trio.sleep(0.05)  # the slow batch holds the writer
        with trio.move_on_after(0.05):
            await store.write(reserve)  # its caller gives up while it waits
        await trio.sleep(0.05)
        # A later write forms the next batch: the cancelled one is not in it.
        await store.write(
            lambda db: book.post(
                db, "t", "credit", [book.Posting("user:2", 1), book.Posting("x:y", -1)]
            )
        )
    assert store.read_sync(lambda db: book.balance(db, "user:1")) == (1, 0)
    assert (
        store.read_sync(lambda db: db.execute("SELECT COUNT(*) FROM reservations").fetchone()[0])
        == 0
    )
    store.close()


@pytest.mark.sqlite_only
async def test_writer_cancelled_before_its_batch_runs_loses_no_other_write(
    tmp_path: Path,
) -> None:
    """The lock holder is cancelled while its batch waits for a worker thread (found by
    the disconnect fuzz): the others' writes in that batch still commit, its own never."""
    store = open_test_store(tmp_path, "w.db")
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    inner = store._run

    async def slow_to_start(fn: Any) -> Any:
        await trio.sleep(0.1)  # like waiting for a free worker thread: cancellable
        return await inner(fn)

    store._run = slow_to_start

    def credit(account: str) -> Any:
        return lambda db: book.post(
            db, account, "credit", [book.Posting(account, 1), book.Posting("x:y", -1)]
        )

    scope = trio.CancelScope()

    async def holder() -> None:
        with scope:
            await store.write(credit("user:a"))

    async with trio.open_nursery() as nursery:
        async with store._write_lock:  # both wait, in this order: A will hold, batch [A, B]
            nursery.start_soon(holder)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(store.write, credit("user:b"))
            await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.03)  # A holds the lock; its batch waits to start
        scope.cancel()
    assert scope.cancelled_caught
    assert store.read_sync(lambda db: book.balance(db, "user:b")) == (1, 0)
    assert store.read_sync(lambda db: book.balance(db, "user:a")) == (0, 0)
    store.close()


async def test_client_leaving_during_admission_uses_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0)
        gw = net.gateway.gw

        class SlowStore:
            """The store, with admission's writes taking 0.2 s (whatever the backend)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(gw.store, name)

            async def write(self, fn: Any) -> Any:
                await trio.sleep(0.2)
                return await gw.store.write(fn)

        gw.admissions.store = SlowStore()  # type: ignore[assignment]
        async with net.client() as c:
            for _ in range(5):
                with pytest.raises(httpx.ReadTimeout):
                    await c.post("/v1/chat/completions", json=chat("x"), timeout=0.05)
        await trio.sleep(1.0)
        gw.admissions.store = gw.store
        assert (await balance(net))["free_remaining"] == 10
        assert await count(net, "SELECT COUNT(*) FROM reservations") == 0
        assert net.engine.requests == [] or all(e["complete"] for e in net.engine.log)


# -- 6. honest output is never punished; dishonest prompts are --------------------------


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_tool_calls_with_short_arguments_are_not_punished(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            backend=backend,
            knobs=Knobs(reply=[], tool_call={"name": "f", "arguments": {}}),
        )
        gw = net.gateway.gw
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        async with net.client() as c:
            for _ in range(6):
                r = await c.post(
                    "/v1/chat/completions", json=chat("call f", tools=tools, max_tokens=200)
                )
                assert r.status_code == 200, r.text
                call = r.json()["choices"][0]["message"]["tool_calls"][0]
                assert call["function"] == {"name": "f", "arguments": "{}"}
                # The engine counted wrapper tokens (1 call + its wrapper): within the bound.
        node = gw.registry.nodes[net.nodes[0].id]
        assert gw.reputation.penalties.get(node.id, 0) == 0
        assert node.cooldown_until == 0 and node.reputation == 1.0


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_reasoning_reaches_the_client_and_is_billed(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    thoughts = ["Let", " me", " think", " about", " it."]
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, backend=backend, knobs=Knobs(reasoning=thoughts)
        )
        gw = net.gateway.gw
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("why"))
            assert r.status_code == 200, r.text
            message = r.json()["choices"][0]["message"]
            assert message["reasoning_content"] == "Let me think about it."
            assert message["content"] == "You said: why"
            # Reasoning counts as completion output: 5 thoughts + 3 answer tokens.
            assert r.json()["usage"]["completion_tokens"] == 8
            async with c.stream("POST", "/v1/chat/completions", json=chat("why", stream=True)) as s:
                events, done, _ = await read_sse(s)
            assert done
            reasoning = "".join(
                e["choices"][0]["delta"].get("reasoning_content", "")
                for e in events
                if e.get("choices")
            )
            assert reasoning == "Let me think about it." and text_of(events) == "You said: why"
        node = gw.registry.nodes[net.nodes[0].id]
        assert gw.reputation.penalties.get(node.id, 0) == 0 and node.cooldown_until == 0


async def test_prompt_over_reporting_is_penalised(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, knobs=Knobs(report_prompt_factor=6))
        gw = net.gateway.gw
        text = "tell me a long story about " + "many different things " * 20
        async with net.client() as c:
            for _ in range(3):
                r = await c.post("/v1/chat/completions", json=chat(text))
                assert r.status_code == 200, r.text
        assert gw.reputation.penalties.get(net.nodes[0].id, 0) >= 1


async def test_honest_prompt_counts_are_not_penalised(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path)
        gw = net.gateway.gw
        async with net.client() as c:
            for text in ("hi", "tell me a long story about " + "things " * 60, "x"):
                for _ in range(2):
                    assert (
                        await c.post("/v1/chat/completions", json=chat(text))
                    ).status_code == 200
        assert gw.reputation.penalties.get(net.nodes[0].id, 0) == 0


async def test_every_node_cooling_down_fails_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, queue_timeout="20")
        node = net.gateway.gw.registry.nodes[net.nodes[0].id]
        node.cooldown_until = trio.current_time() + 42
        async with net.client() as c:
            started = trio.current_time()
            r = await c.post("/v1/chat/completions", json=chat("x"))
            assert trio.current_time() - started < 2
        error = assert_error(r, 503, "no_capacity")
        assert "cooling down" in error["message"]
        assert 40 <= int(r.headers["Retry-After"]) <= 42


async def test_version_1_agents_keep_working(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=0)
        async with rogue_node(net.url, protocol_version=1) as rogue:
            assert rogue.reply["type"] == "welcome" and rogue.reply["protocol_version"] == 1
            r = await ask_rogue(net, rogue, "ok", {"prompt_tokens": 2, "completion_tokens": 1})
            assert r.json()["choices"][0]["message"]["content"] == "ok"


# -- 7. the smaller ones ----------------------------------------------------------------


async def test_slow_reading_client_does_not_blame_the_node(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import routecat.network.link

    monkeypatch.setattr(
        routecat.network.link, "INBOX_SIZE", 4
    )  # overflow after socket buffers fill
    with trio.fail_after(60):
        net = await start_network(nursery, tmp_path, knobs=Knobs(repeat=3000, delay=0.0002))
        gw = net.gateway.gw
        host, port = net.url.removeprefix("http://").split(":")
        body = json.dumps(chat("a b c d e f g h", stream=True)).encode()
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        stream = trio.SocketStream(sock)
        await stream.send_all(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {net.key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body
        )
        # Never read: the job's buffers fill up and it is cancelled as the client's doing.
        await wait_for(lambda: net.engine.aborted, timeout=30)
        await wait_for(lambda: not gw.scheduler.jobs, timeout=5)
        assert net.engine.finished == 0
        node = gw.registry.nodes[net.nodes[0].id]
        assert node.cooldown_until == 0 and node.failures == 0
        row = await gw.store.read(lambda db: db.execute("SELECT * FROM jobs").fetchone())
        assert row["outcome"] == "client_gone" and row["tokens_out"] > 0
        await stream.aclose()
        async with net.client() as c:  # the node still serves
            assert (await c.post("/v1/chat/completions", json=chat("x"))).status_code == 200


async def test_client_leaving_after_dispatch_pays_the_prompt(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), knobs=Knobs(first_delay=3)
        )
        gw = net.gateway.gw
        text = "a long prompt to prefill " * 20
        async with net.client() as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/chat/completions", json=chat(text), timeout=0.5)
        await wait_for(lambda: not gw.scheduler.jobs)
        row = await gw.store.read(lambda db: db.execute("SELECT * FROM jobs").fetchone())
        assert row["outcome"] == "client_gone"
        assert row["tokens_in"] > 0 and row["tokens_out"] == 0 and row["cost_msat"] > 0
        assert (await balance(net))["free_remaining"] == 9  # the free request was used
        await ledger_ok(net)


async def test_queued_request_outlives_the_sweeper(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            max_jobs=1,
            knobs=Knobs(first_delay=3),
            queue_timeout="2.5",
            sweep_interval="0.5",
        )
        gw = net.gateway.gw
        async with net.client() as c, trio.open_nursery() as inner:
            inner.start_soon(
                functools.partial(c.post, "/v1/chat/completions", json=chat("occupies"))
            )
            await wait_for(lambda: net.engine.active == 1)
            r = await c.post("/v1/chat/completions", json=chat("waits"))
            assert_error(r, 503, "no_capacity")  # the queue timed out
            # Its free request came back: the sweeper never took its reservation early.
            assert (await balance(net))["free_remaining"] == 9
        await wait_for(lambda: not gw.scheduler.jobs)
        assert (await balance(net))["free_remaining"] == 9
        assert await count(net, "SELECT COUNT(*) FROM reservations") == 0
        await ledger_ok(net)


async def test_unknown_websocket_path_is_a_clean_404(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(nursery, _config(tmp_path))
    url = gateway.url.replace("http", "ws") + "/v1/x"
    with pytest.raises(BaseExceptionGroup) as rejected:
        async with open_gateway_socket(url, [], max_message_size=1024):
            pass
    error: BaseException = rejected.value
    while isinstance(error, BaseExceptionGroup):
        (error,) = error.exceptions
    assert isinstance(error, trio_websocket.ConnectionRejected)
    assert error.status_code == 404
    assert json.loads(error.body or b"")["error"]["code"] == "not_found"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_413_closes_the_connection_and_the_next_request_works(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    gateway = await start_gateway(nursery, _config(tmp_path, max_body_bytes="2000"))
    big = json.dumps({"name": "x" * 5000})
    with trio.fail_after(30):
        for _ in range(5):
            async with gateway.client() as c:
                r = await c.post("/v1/auth/register", content=big)
                assert_error(r, 413, "request_too_large")
                assert r.headers["Connection"] == "close"
                assert (await c.post("/v1/auth/register", json={"name": "a"})).status_code == 200
            async with gateway.client() as fresh:
                assert (
                    await fresh.post("/v1/auth/register", json={"name": "b"})
                ).status_code == 200


async def test_sigterm_with_idle_keepalive_exits_at_once(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "routecat",
            "serve",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "r.db"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    break
                except OSError:
                    await trio.sleep(0.1)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" in await stream.receive_some(1000)
            # The connection stays open and idle.
            started = time.monotonic()
            proc.terminate()
            await proc.wait()
        assert proc.returncode == 0
        assert time.monotonic() - started < 3
        await stream.aclose()
    finally:
        if proc.returncode is None:
            proc.kill()


async def test_fresh_key_asking_many_tokens_is_served_free_and_capped(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path), credit_sats=0)
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("x", max_tokens=2000))
            assert r.status_code == 200, r.text
            assert r.headers["X-RouteCat-Free"] == "1"
            async with c.stream(
                "POST", "/v1/chat/completions", json=chat("y", max_tokens=2000, stream=True)
            ) as s:
                assert s.headers["X-RouteCat-Free"] == "1"
                await s.aread()
        assert [b["options"]["num_predict"] for b in net.engine.requests] == [1024, 1024]
        assert (await balance(net))["free_remaining"] == 8


async def test_402_says_why_the_request_could_not_be_free(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            catalog=catalog(tmp_path),
            credit_sats=0,
            knobs=Knobs(models=[MODEL, "unlisted:1b"]),
            free_daily_requests="1",
        )
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json={**chat("x"), "model": "unlisted:1b"})
            assert (
                "not in this gateway's free catalog"
                in assert_error(r, 402, "insufficient_balance")["message"]
            )
            assert (await c.post("/v1/chat/completions", json=chat("x"))).status_code == 200
            r = await c.post("/v1/chat/completions", json=chat("x"))
            assert (
                "free requests for today are used"
                in assert_error(r, 402, "insufficient_balance")["message"]
            )


async def test_routing_fees_have_their_own_account(tmp_path: Path) -> None:
    from routecat.money.lightning.backend import Payment
    from routecat.money.lightning.payouts import Due, finish_payout, hold_payout, start_payout
    from routecat.server import open_store

    store = open_store(_config(tmp_path))

    def seed(db: Any) -> None:
        book.post(
            db,
            "seed",
            "credit",
            [book.Posting("provider:n", 200_000), book.Posting(book.OPERATOR_EQUITY, -200_000)],
        )

    store.write_sync(seed)
    # An earlier failure held this provider's payout; a paid one clears the hold.
    store.write_sync(lambda db: hold_payout(db, "n", "an earlier failure", 0.0))
    payout = store.write_sync(
        lambda db: start_payout(db, Due("n", "n@x.example", 100_000), "ab" * 32, "lnbc", 0.0)
    )
    assert payout is not None
    store.write_sync(
        lambda db: finish_payout(db, payout, Payment("paid", "ab" * 32, fee_msat=1500), 1.0)
    )
    assert store.read_sync(lambda db: book.balance(db, book.ROUTING_FEES))[0] == -1500
    assert store.read_sync(lambda db: book.balance(db, book.OPERATOR_FEE))[0] == 0
    assert store.read_sync(lambda db: book.balance(db, book.LIGHTNING_OUT))[0] == 101_500
    held = store.read_sync(lambda db: db.execute("SELECT COUNT(*) FROM payout_holds").fetchone()[0])
    assert held == 0
    assert store.read_sync(book.check).ok
    store.close()


@attrs.define
class StubBackend:
    """A Lightning backend whose answers the test sets."""

    state: str = "pending"
    fee_msat: int = 0
    name: str = "stub"
    network: str = "regtest"
    calls: int = 0

    async def invoice_status(self, payment_hash: str) -> Any:
        from routecat.money.lightning.backend import InvoiceStatus

        self.calls += 1
        return InvoiceStatus(self.state)  # type: ignore[arg-type]

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Any:
        raise KeyError("payment_request")  # a backend answering nonsense


async def test_topup_expires_only_on_the_backends_word_and_late_payment_counts(
    tmp_path: Path,
) -> None:
    from routecat.clock import Clock
    from routecat.money.lightning.topups import EXPIRED_GRACE, Topups
    from routecat.server import open_store

    config = _config(tmp_path)
    store = open_store(config)
    backend = StubBackend()
    clock = [1000.0]
    topups = Topups(store, config, backend, clock=Clock(wall=lambda: clock[0]))  # type: ignore[arg-type]
    store.write_sync(
        lambda db: db.execute(
            "INSERT INTO topups (payment_hash, key_id, amount_msat, bolt11, backend, created_at,"
            " expires_at) VALUES (?, 1, 50000, 'lnbc', 'stub', 400, 1000)",
            ("ab" * 32,),
        )
    )

    def state() -> str:
        row = store.read_sync(lambda db: db.execute("SELECT state FROM topups").fetchone())
        return str(row[0])

    clock[0] = 1000 + EXPIRED_GRACE - 1  # past expiry by our clock, within the grace
    assert await topups.check("ab" * 32) == "pending" and state() == "pending"
    clock[0] = 1000 + EXPIRED_GRACE + 1  # grace passed, the backend still says unpaid
    assert await topups.check("ab" * 32) == "expired" and state() == "expired"
    backend.state = "paid"  # the payment arrives late: still credited, once
    assert await topups.reconcile(expired_too=True) == 1
    assert await topups.reconcile(expired_too=True) == 0
    assert state() == "paid"
    assert store.read_sync(lambda db: book.balance(db, "user:1"))[0] == 50000
    assert store.read_sync(book.check).ok
    # A backend that answers nonsense when asked for an invoice: a clean 503.
    from routecat.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable):
        await topups.create(1, 100)
    store.close()


async def test_routing_fee_over_the_cap_is_flagged(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from routecat.money.lightning.backend import Payment
    from tests.servers import earn

    with trio.fail_after(60):
        net, _ = await earn(nursery, tmp_path, payout_interval="3600")
        gw = net.gateway.gw
        backend = gw.payouts.backend

        class Dear:
            """The dev wallet, but every payment's routing fee is over the cap (as
            LNbits or phoenixd could charge: they take no per-payment limit)."""

            def __getattr__(self, name: str) -> Any:
                return getattr(backend, name)

            async def pay_invoice(self, pr: str, max_fee_msat: int) -> Payment:
                paid = await backend.pay_invoice(pr, max_fee_msat)
                return Payment("paid", paid.payment_hash, fee_msat=max_fee_msat + 5000)

        gw.payouts.backend = Dear()  # type: ignore[assignment]
        try:
            await gw.payouts.cycle()
        finally:
            gw.payouts.backend = backend
        assert [p.state for p in await gw.payouts.list()] == ["paid"]
        assert any("exceeded the cap" in r.getMessage() for r in caplog.records)
        fee = (await gw.payouts.list())[0].fee_msat
        routing = await gw.store.read(lambda db: book.balance(db, book.ROUTING_FEES))
        assert routing[0] == -fee and fee > 10_000
        await ledger_ok(net)


async def test_failing_settlement_is_kept_and_retried(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from routecat.money.settlement import Settlement

    original = Settlement._settle_write
    failures = [3]

    def flaky(self: Settlement, *args: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return original(self, *args)

    monkeypatch.setattr(Settlement, "_settle_write", flaky)
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, free_daily_requests="0")
        gw = net.gateway.gw
        before = (await balance(net))["balance_msat"]
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("pay me later"))
        assert r.status_code == 200, r.text
        cost = r.json()["usage"]["cost_msat"]
        assert cost > 0
        # The process stays up; the bill commits once the store works again.
        await wait_for(lambda: failures[0] == 0 and not gw.settlement._unsettled, timeout=10)
        assert (await balance(net))["balance_msat"] == before - cost
        assert await count(net, "SELECT COUNT(*) FROM jobs") == 1
        assert await count(net, "SELECT COUNT(*) FROM reservations") == 0
        assert gw.metrics.settlement_retries._value.get() >= 1
        async with net.gateway.client() as c:
            assert (await c.get("/healthz")).status_code == 200
        await ledger_ok(net)


def test_provider_totals_count_every_payout(tmp_path: Path) -> None:
    """The providers page summed paid and pending payouts over its list of the latest
    50 only; a node with more was under-reported."""
    from routecat.server import open_store
    from routecat.web.pages import node_summary

    store = open_store(_config(tmp_path))

    def seed(db: Any) -> None:
        db.execute(
            "INSERT INTO nodes (id, secret_hash, created_at, last_seen_at)"
            " VALUES ('n', 'x', '2026-01-01', '2026-01-01')"
        )
        for i in range(60):
            db.execute(
                "INSERT INTO payouts (node_id, address, amount_msat, state, created_at,"
                " updated_at) VALUES ('n', 'n@x.example', 1000000, ?, ?, ?)",
                ("pending" if i == 59 else "paid", float(i), float(i)),
            )

    store.write_sync(seed)
    summary = store.read_sync(lambda db: node_summary(db, "n", 0.0))
    assert summary is not None
    assert summary["paid_sats"] == 59 * 1000 and summary["pending_sats"] == 1000
    assert len(summary["payouts"]) == 50
    store.close()
