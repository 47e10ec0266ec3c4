"""Stock Go Owlrun agents (the compatibility mode) through the emulator of
``tests/stock_agent.py``: served like native nodes, billed with verified usage, and
held to RouteCat's security."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.clients import MODEL, chat, wait_for
from tests.fakes import Knobs, start_engine
from tests.servers import assert_error, catalog, ledger_ok, start_network, start_node
from tests.stock_agent import StockAgent, provider_key


async def compat_network(nursery: trio.Nursery, tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return await start_network(
        nursery, tmp_path, nodes=0, owlrun_compat="true", catalog=catalog(tmp_path), **overrides
    )


async def test_sdk_through_a_stock_agent(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await compat_network(nursery, tmp_path)
        engine = await start_engine(nursery, Knobs())
        agent = StockAgent(net.url, engine.url, [MODEL], piece=7)  # pieces that cut lines
        await nursery.start(agent.run)
        await wait_for(lambda: agent.node_id in net.gateway.gw.registry.nodes, timeout=10)
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
        # The request it fetched: the OpenAI body, streamed, usage included, max_tokens set.
        assert agent.fetched[-1]["stream"] is True
        assert agent.fetched[-1]["stream_options"] == {"include_usage": True}
        assert agent.fetched[-1]["max_tokens"] == 1024  # a free request: the free cap
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


async def test_a_reject_fails_over_to_a_native_node(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(40):
        net = await compat_network(nursery, tmp_path, free_daily_requests="0")
        engine = await start_engine(nursery, Knobs())
        refuser = StockAgent(net.url, engine.url, [MODEL], reject_all=True)
        await nursery.start(refuser.run)
        await wait_for(lambda: refuser.node_id in net.gateway.gw.registry.nodes, timeout=10)
        # One slot each: the two are equally loaded, so the refuser is picked first.
        await start_node(nursery, net.url, engine, max_jobs=1)
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


# The gateway closes the emulator's websocket under it (that is the point of the test);
# trio-websocket then drops the client's TCP socket to the garbage collector unclosed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
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
        gc.collect()  # the dropped socket (see the mark) is collected here, not in a later test
