"""Stock Go Owlrun agents (the compatibility mode) through the emulator of
``tests/stock_agent.py``: served like native nodes, billed with verified usage, and
held to RouteCat's security."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trio_websocket

from ledger.money import split
from owlrun.agent import open_gateway_socket
from tests.clients import MODEL, chat, read_sse, text_of, wait_for
from tests.fakes import Knobs, start_engine
from tests.procs import stop_process
from tests.servers import (
    assert_error,
    balance,
    catalog,
    earn,
    ledger_ok,
    start_network,
    start_node,
)
from tests.stock_agent import StockAgent, provider_key


async def compat_network(nursery: trio.Nursery, tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return await start_network(
        nursery, tmp_path, nodes=0, owlrun_compat="true", catalog=catalog(tmp_path), **overrides
    )


async def test_sdk_through_a_stock_agent(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await compat_network(nursery, tmp_path)
        engine = await start_engine(nursery, Knobs())
        # The emulator in its own process, relaying in 7-byte pieces that cut lines.
        node_id = str(uuid.uuid4())
        command = [sys.executable, "-m", "tests.stock_agent", net.url, engine.url, MODEL]
        process = await trio.lowlevel.open_process([*command, "--node-id", node_id, "--piece", "7"])
        nursery.start_soon(stop_process, process)
        await wait_for(lambda: node_id in net.gateway.gw.registry.nodes, timeout=20)
        assert net.gateway.gw.registry.nodes[node_id].describe(0)["kind"] == "stock"
        client = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}]
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
        # The request it fetched (the engine saw it): streamed, usage included, max_tokens.
        assert engine.requests[-1]["stream"] is True
        assert engine.requests[-1]["stream_options"] == {"include_usage": True}
        assert engine.requests[-1]["max_tokens"] == 1024  # a free request: the free cap
        engine.knobs.reply = []
        engine.knobs.tool_call = {"name": "get_weather", "arguments": {"city": "Paris"}}
        t = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "weather?"}],
            tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
        )
        call = t.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert t.choices[0].finish_reason == "tool_calls"
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        # Reasoning, where the relayed SSE carries it (reasoning_content deltas).
        engine.knobs.tool_call, engine.knobs.reasoning = None, ["Let me ", "think."]
        engine.knobs.reply = ["Yes."]
        async with net.client() as c:
            thought = await c.post("/v1/chat/completions", json=chat("think"))
        assert thought.status_code == 200, thought.text
        message = thought.json()["choices"][0]["message"]
        assert message["reasoning_content"] == "Let me think." and message["content"] == "Yes."
        await client.close()
        await ledger_ok(net)


async def test_a_node_id_is_bound_to_its_key(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await compat_network(nursery, tmp_path)
        engine = await start_engine(nursery, Knobs())
        agent = StockAgent(net.url, engine.url, [MODEL], lightning_address="alice@provider.example")
        async with httpx.AsyncClient() as c:
            assert (await agent.register(c)).status_code == 200
            thief = StockAgent(
                net.url, engine.url, [MODEL], node_id=agent.node_id, key=provider_key(),
                lightning_address="mallory@thief.example",
            )  # fmt: skip
            r = await thief.register(c)
            assert_error(r, 401, "invalid_api_key")
            assert thief.key not in r.text
            bad = await c.post(
                f"{net.url}/v1/gateway/register",
                json={"node_id": agent.node_id},
                headers={"Authorization": "Bearer not-a-key"},
            )
            assert_error(bad, 401, "invalid_api_key")
            # A job request is served once, and only to its node's key.
            stranger = await c.get(
                f"{net.url}/v1/gateway/jobs/chatcmpl-x/proxy/request",
                headers={"Authorization": f"Bearer {provider_key()}"},
            )
            assert_error(stranger, 404, "not_found")


async def stock_beside_native(nursery: trio.Nursery, net: Any, **behaviour: Any) -> StockAgent:
    """A stock agent (``behaviour``: how it misbehaves) online first, then a native node
    with one slot, both over the same engine."""
    engine = await start_engine(nursery, Knobs())
    agent = StockAgent(net.url, engine.url, [MODEL], **behaviour)
    await nursery.start(agent.run)
    await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
    await start_node(nursery, net.url, engine, max_jobs=1)
    return agent


async def test_a_reject_fails_over_to_a_native_node(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path, free_daily_requests="0")
        # One slot each: the two are equally loaded, so the refuser is picked first.
        refuser = await stock_beside_native(nursery, net, reject_all=True)
        # The refuser rejects, and the job moves on to the native node.
        async with net.client() as c:
            for i in range(4):
                r = await c.post("/v1/chat/completions", json=chat(f"go {i}"))
                assert r.status_code == 200, r.text
        assert refuser.jobs  # it was offered at least one
        await ledger_ok(net)


async def test_a_stock_agent_lying_about_usage_is_billed_at_the_bound(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path, free_daily_requests="0")
        engine = await start_engine(nursery, Knobs())
        liar = StockAgent(net.url, engine.url, [MODEL], usage_factor=10)
        await nursery.start(liar.run)
        await wait_for(lambda: liar.node_id in net.gateway.gw.registry.nodes, timeout=10)
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("hello there", max_tokens=2000))
        assert r.status_code == 200, r.text
        # Reported 40 completion tokens for 21 bytes: billed at the bound, 21 + 1.
        assert r.json()["usage"]["completion_tokens"] == len(b"You said: hello there") + 1
        await ledger_ok(net)


async def test_compat_is_off_by_default(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, nodes=0)
        engine = await start_engine(nursery, Knobs())
        agent = StockAgent(net.url, engine.url, [MODEL])
        async with httpx.AsyncClient() as c:
            assert_error(await agent.register(c), 404, "not_found")


async def test_a_client_leaving_closes_the_agents_only_job_and_is_billed_delivered(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path, free_daily_requests="0")
        engine = await start_engine(nursery, Knobs(delay=0.1, repeat=50))
        agent = StockAgent(net.url, engine.url, [MODEL], heartbeat=0.2)
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        # Heartbeats are answered, with a zero balance (no ecash withdrawal is asked).
        await wait_for(lambda: bool(agent.acks), timeout=5)
        assert agent.acks[0]["type"] == "heartbeat_ack" and agent.acks[0]["balance_sats"] == 0
        sessions = agent.registered
        async with (
            net.client() as c,
            c.stream(
                "POST", "/v1/chat/completions", json=chat("long", stream=True, max_tokens=2000)
            ) as r,
        ):
            got = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
        # Its only job: the socket is closed (the agent has no cancel), it registers again.
        await wait_for(lambda: agent.registered > sessions, timeout=10)
        await wait_for(lambda: not net.gateway.gw.scheduler.jobs, timeout=10)
        async with net.client() as c:
            usage = (await c.get("/v1/auth/usage")).json()["data"][0]
        assert 0 < usage["tokens_out"] < 2000  # the delivered part, not the whole answer
        await ledger_ok(net)


async def test_a_fetch_that_never_comes_fails_over_to_a_native_node(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """An agent that accepts and never fetches: its jobs fail over at the fetch deadline,
    long before the first-token timeout (two minutes by default), and the client sees
    only the native node's answer."""
    with trio.fail_after(40):
        net = await compat_network(
            nursery, tmp_path, free_daily_requests="0", compat_fetch_timeout="0.5"
        )
        mute = await stock_beside_native(nursery, net, fetch=False)
        async with net.client() as c:
            for i in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"go {i}"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"You said: go {i}"
        assert mute.jobs and not mute.fetched  # it was offered jobs and fetched none
        # Its socket stays up (the job failed over; nothing had to be cancelled).
        assert mute.registered == 1 and mute.node_id in net.gateway.gw.registry.nodes
        await ledger_ok(net)


async def test_an_engine_failing_before_the_first_token_fails_over(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The Go agent sends nothing at all when its engine fails: the first-token timeout
    sees it, and the job moves on to a native node."""
    with trio.fail_after(40):
        net = await compat_network(
            nursery, tmp_path, free_daily_requests="0", first_token_timeout="1"
        )
        broken = await start_engine(nursery, Knobs(fail_status=500))
        silent = StockAgent(net.url, broken.url, [MODEL])
        await nursery.start(silent.run)
        await wait_for(lambda: silent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        healthy = await start_engine(nursery, Knobs())
        await start_node(nursery, net.url, healthy, max_jobs=1)
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("anyone there"))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "You said: anyone there"
        assert silent.fetched and broken.requests  # it had the job first, and went silent
        await ledger_ok(net)


async def test_an_engine_failing_mid_stream_ends_it_with_the_usual_error_event(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Mid-stream, the silence ends at the inter-token timeout with the documented error
    event, and the client pays for what it received, no more."""
    with trio.fail_after(40):
        net = await compat_network(
            nursery, tmp_path, free_daily_requests="0", inter_token_timeout="1"
        )
        crashing = await start_engine(nursery, Knobs(crash_after=3, repeat=20))
        agent = StockAgent(net.url, crashing.url, [MODEL], piece=64)
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        before = await balance(net)
        async with (
            net.client() as c,
            c.stream("POST", "/v1/chat/completions", json=chat("go on", stream=True)) as s,
        ):
            events, done, _ = await read_sse(s)
        assert not done
        assert events[-1]["error"]["code"] == "upstream_error", events[-1]
        delivered = text_of(events[:-1])
        assert delivered and ("You said: go on " * 20).startswith(delivered)
        spent = before["balance_msat"] - (await balance(net))["balance_msat"]
        async with net.client() as c:
            usage = (await c.get("/v1/auth/usage")).json()["data"][0]
        assert 0 < usage["tokens_out"] <= len(delivered.encode()) + 1 and spent > 0
        await ledger_ok(net)


async def test_a_stock_node_is_paid_to_its_address_and_told_its_earnings(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Paid jobs through a stock agent earn its provider 95%, paid to the Lightning
    Address it registered with its threshold clamped to the operator's bounds, and its
    heartbeats are answered with what it earned and was paid, in the Go agent's types."""
    with trio.fail_after(60):
        agent = StockAgent(
            "", "", [MODEL], lightning_address="alice@provider.example",
            threshold_sats=5, heartbeat=0.2,
        )  # fmt: skip
        net, lnurl = await earn(nursery, tmp_path, stock=agent)
        gw = net.gateway.gw
        assert gw.registry.nodes[agent.node_id].payout_threshold_sats == 100  # 5, clamped
        await wait_for(lambda: gw.payouts.paid == 1, timeout=15)
        (_invoice, amount_msat), *_ = lnurl.invoices
        figures = await gw.earnings.of(agent.node_id)
        assert figures["paid_msat"] == amount_msat >= 100_000
        # 95% of what the customer was charged for the agent's jobs, all of it paid out.
        async with net.client() as c:
            jobs = (await c.get("/v1/auth/usage")).json()["data"]
        assert len(jobs) == 12
        assert figures["earned_msat"] == sum(split(j["cost_msat"])[0] for j in jobs)
        await wait_for(lambda: bool(agent.acks and agent.acks[-1]["withdraw_history"]), timeout=5)
        ack = agent.acks[-1]
        assert ack["status"] == "ok" and ack["balance_sats"] == 0
        assert ack["earned_total_sats"] == figures["earned_msat"] // 1000
        assert ack["withdraw_history"][0]["amount_sats"] == amount_msat // 1000
        assert all(isinstance(v, int) for k, v in ack.items() if k.endswith("_sats"))
        # The providers page says what the node runs, and what it was paid.
        async with net.client() as c:
            page = (await c.get("/providers", params={"node": agent.node_id})).text
        assert "Agent: stock Owlrun (Go), version owlrun-go/1.4.2." in page
        assert f'<dd id="node-paid">{amount_msat // 1000} sats</dd>' in page
        await ledger_ok(net)


async def closed_with(url: str) -> int | None:
    """The close code of a websocket the gateway closes at once."""
    codes = []
    try:
        async with open_gateway_socket(url, [], max_message_size=1 << 20) as ws:
            await ws.get_message()
    except* trio_websocket.ConnectionClosed as group:
        codes = [
            e.reason.code
            for e in group.exceptions
            if isinstance(e, trio_websocket.ConnectionClosed)
        ]
    return codes[0] if codes else None


async def test_the_provider_key_never_reaches_a_log_or_an_answer(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The key travels in the websocket URL's query and the registration body: it is in
    no log record (at any level), no metric and no error message."""
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path)
        engine = await start_engine(nursery, Knobs())
        agent = StockAgent(net.url, engine.url, [MODEL])
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        answers = []
        async with net.client() as c:
            answers.append(await c.post("/v1/chat/completions", json=chat("hello there")))
            # A socket for a key never registered, a registration with a bad body, a fetch
            # of an unknown job, and the operator's metrics.
            stray = provider_key()
            url = net.url.replace("http", "ws", 1) + f"/v1/gateway/ws?api_key={stray}"
            assert await closed_with(url) == 1008
            answers.append(
                await c.post(
                    "/v1/gateway/register",
                    json={"node_id": 5, "api_key": agent.key},
                    headers={"Authorization": f"Bearer {agent.key}"},
                )
            )
            answers.append(
                await c.get(
                    "/v1/gateway/jobs/nope/proxy/request",
                    headers={"Authorization": f"Bearer {agent.key}"},
                )
            )
            answers.append(await c.get("/metrics"))
        assert [a.status_code for a in answers[:3]] == [200, 400, 404]
        # Every record but the emulator's own client libraries' (they log the URL they dial).
        clients = ("trio-websocket", "httpx", "httpcore")
        logged = [r.getMessage() for r in caplog.records if not r.name.startswith(clients)]
        text = "\n".join(logged + [a.text for a in answers])
        assert any(agent.node_id in m for m in logged)  # the session was logged, by node id
        for key in (agent.key, stray):
            for line in text.splitlines():
                assert key[10:] not in line, line


async def test_native_and_stock_nodes_share_a_model(nursery: trio.Nursery, tmp_path: Path) -> None:
    """One model, one native node and one stock agent, one job at a time each: a burst
    of requests is spread over both and every answer is exact."""
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path, free_daily_requests="0")
        engine = await start_engine(nursery, Knobs(delay=0.05))
        agent = StockAgent(net.url, engine.url, [MODEL])
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        native = await start_node(nursery, net.url, engine, max_jobs=1)
        answers: dict[int, str] = {}

        async def ask(i: int) -> None:
            async with net.client() as c:
                r = await c.post("/v1/chat/completions", json=chat(f"burst {i}"))
            assert r.status_code == 200, r.text
            answers[i] = r.json()["choices"][0]["message"]["content"]

        async with trio.open_nursery() as burst:
            for i in range(6):
                burst.start_soon(ask, i)
        assert answers == {i: f"You said: burst {i}" for i in range(6)}
        assert agent.fetched and native.agent.totals.jobs > 0  # both served
        assert len(agent.fetched) + native.agent.totals.jobs == 6
        await ledger_ok(net)


async def test_a_client_leaving_a_shared_agent_lets_the_other_job_finish(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Two jobs on one stock agent (compat_concurrency 2): the client of one leaves; the
    socket stays open (closing it would kill the other job), the abandoned job runs out
    on the agent with its output dropped and is billed as the client's leaving, and the
    other answer arrives whole."""
    with trio.fail_after(40):
        net = await compat_network(
            nursery, tmp_path, free_daily_requests="0", compat_concurrency="2"
        )
        engine = await start_engine(nursery, Knobs(delay=0.02, repeat=20))
        agent = StockAgent(net.url, engine.url, [MODEL])
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
        full = "You said: stay here" * 20
        kept: list[str] = []

        async def stays() -> None:
            async with (
                net.client() as c,
                c.stream("POST", "/v1/chat/completions", json=chat("stay here", stream=True)) as r,
            ):
                events, done, _ = await read_sse(r)
            assert done
            kept.append(text_of(events))

        async with trio.open_nursery() as both:
            both.start_soon(stays)
            await wait_for(lambda: len(engine.requests) == 1, timeout=5)
            async with (
                net.client() as c,
                c.stream("POST", "/v1/chat/completions", json=chat("leave", stream=True)) as r,
            ):
                got = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        got += 1
                        if got == 3:
                            break
        assert kept == [full]
        assert agent.registered == 1  # its socket was never closed
        await wait_for(lambda: not net.gateway.gw.scheduler.jobs, timeout=10)
        rows = await net.gateway.gw.store.read(
            lambda db: sorted(tuple(r) for r in db.execute("SELECT outcome, tokens_out FROM jobs"))
        )
        assert [outcome for outcome, _ in rows] == ["client_gone", "done"]
        assert 0 < rows[0][1] < rows[1][1]  # the leaver pays for part of its answer
        await ledger_ok(net)
