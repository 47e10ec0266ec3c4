"""The node network end to end: real gateway, real owlrun agents, real websockets,
local engines speaking Ollama's and OpenAI's wire formats."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import trio_websocket
from hypothesis import example, given, settings
from hypothesis import strategies as st

from owlrun.agent import Agent, open_gateway_socket
from owlrun.engines import OllamaEngine
from owlrun.identity import Identity
from owlrun.protocol import (
    HEARTBEAT_INTERVAL_RANGE,
    NODE_HEADER,
    QUIET_GATEWAY_PROTOCOL,
    SECRET_HEADER,
    WS_PATH,
    Hello,
    ModelInfo,
    decode,
    encode,
)
from routecat.network import session
from tests.clients import MODEL, chat, read_sse, text_of, wait_for
from tests.fakes import Knobs, start_engine
from tests.servers import assert_error, start_network, start_node, start_relay


def test_chunk_frames_round_trip_and_batches() -> None:
    from owlrun.protocol import Chunk, Chunks, Delta, ProtocolError

    one = Chunk("job1", Delta("hi", [{"index": 0, "function": {"arguments": "{}"}}]))
    batch = Chunks("job1", [Delta("a"), Delta(None, [{"index": 0}]), Delta("b")])
    assert decode(encode(one)) == one
    assert decode(encode(batch)) == batch
    for bad in (
        {"type": "chunk", "job_id": "j"},
        {"type": "chunk", "job_id": "j", "delta": {"content": 1}},
        {"type": "chunks", "job_id": "j", "deltas": [{"content": "a"}] * 300},
        {"type": "chunks", "job_id": "j", "delta": {"content": "a"}},
        {"type": "chunk", "job_id": "j", "deltas": [{"content": "a"}]},
    ):
        with pytest.raises(ProtocolError):
            decode(json.dumps(bad))


async def test_models_appear_and_disappear(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, knobs=Knobs(models=["llama3.1:8b", "qwen2.5:7b"])
        )
        async with net.client() as c:
            body = (await c.get("/v1/models")).json()
            assert body["object"] == "list"
            assert {m["id"] for m in body["data"]} == {"llama3.1:8b", "qwen2.5:7b"}
            assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])
            net.engine.knobs.models.append("gemma2:9b")  # pulled while running
            await wait_for(lambda: "gemma2:9b" in net.gateway.gw.registry.online_models())
            started = time.monotonic()
            await net.nodes[0].kill()
            while (await c.get("/v1/models")).json()["data"]:
                await trio.sleep(0.05)
            assert time.monotonic() - started < 3
            # Known (seen within 24 h) but offline: 503 with Retry-After, not 404.
            r = await c.post("/v1/chat/completions", json=chat("hi"))
            assert_error(r, 503, "no_capacity")
            assert int(r.headers["Retry-After"]) > 0
            r = await c.post("/v1/chat/completions", json={**chat("hi"), "model": "never:seen"})
            assert_error(r, 404, "model_not_found")


async def test_openai_sdk_non_stream_and_stream(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path)
        client = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=50
        )
        assert r.choices[0].message.content == "You said: hello there"
        assert r.choices[0].finish_reason == "stop"
        assert r.id.startswith("chatcmpl-")
        assert r.usage is not None
        assert r.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream me please"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == "You said: stream me please"
        )
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 5
        assert len({c.id for c in chunks}) == 1
        assert chunks[0].id != r.id
        legacy = await client.completions.create(
            model=MODEL, prompt="def add(a, b):", max_tokens=20
        )
        assert legacy.choices[0].text == "Completion of: def add(a, b):"
        await client.close()
    assert set(net.settled.values()) == {1}


async def test_openai_backend_stream(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, backend="openai")
        async with (
            net.client() as c,
            c.stream(
                "POST",
                "/v1/chat/completions",
                json=chat("via openai engine", stream=True, max_completion_tokens=3),
            ) as r,
        ):
            events, done, _ = await read_sse(r)
        assert done
        assert text_of(events) == "You said: via"
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        sent = net.engine.requests[-1]
        assert sent["max_tokens"] == 3
        assert sent["stream_options"] == {"include_usage": True}


async def test_tool_call_round_trip_and_json_mode(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(
            nursery,
            tmp_path,
            knobs=Knobs(
                reply=[], tool_call={"name": "get_weather", "arguments": {"city": "Paris"}}
            ),
        )
        client = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ]
        r = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "weather in Paris?"}],
            tools=tools,  # type: ignore[list-item]
        )
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert r.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
        assert net.engine.requests[-1]["tools"] == tools
        net.engine.knobs.tool_call = None
        net.engine.knobs.reply = ['{"temp":', " 21}"]
        r2 = await client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
                {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
            ],
            response_format={"type": "json_object"},
        )
        assert json.loads(r2.choices[0].message.content or "") == {"temp": 21}
        sent = net.engine.requests[-1]
        assert sent["format"] == "json"
        assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
        assert sent["messages"][2]["role"] == "tool"
        # Streamed tool calls reach the SDK as deltas too.
        net.engine.knobs.tool_call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
        net.engine.knobs.reply = []
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], tools=tools, stream=True
        )  # type: ignore[list-item]
        chunks = [c async for c in stream]
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        await client.close()


async def test_client_disconnect_aborts_engine(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, knobs=Knobs(delay=0.05, repeat=200))
        async with (
            net.client() as c,
            c.stream("POST", "/v1/chat/completions", json=chat("long story", stream=True)) as r,
        ):
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 5:
                    break
            left = time.monotonic()
        await wait_for(lambda: net.engine.aborted, timeout=3)
        assert net.engine.aborted[0] - left < 1.0
        await wait_for(lambda: net.settled, timeout=3)
        assert list(net.settled.values()) == [1]
        result_outcomes = await net.gateway.gw.store.read(
            lambda db: [r[0] for r in db.execute("SELECT outcome FROM jobs")]
        )
        assert result_outcomes == ["client_gone"]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_the_agent_keeps_one_connection_to_its_engine(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """Jobs one after the other reuse the agent's connection to the engine: it reads
    each answer's body to its end instead of dropping the connection at the last event."""
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, backend=backend)
        async with net.client() as c:
            for n in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"ask {n}"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"You said: ask {n}"
                async with c.stream(
                    "POST", "/v1/chat/completions", json=chat(f"stream {n}", stream=True)
                ) as s:
                    events, done, _ = await read_sse(s)
                assert done and text_of(events) == f"You said: stream {n}"
        await wait_for(lambda: len(net.settled) == 6)
    assert len(net.engine.peers) == 6
    assert len(set(net.engine.peers)) == 1, net.engine.peers


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_an_engine_that_keeps_the_body_open_after_the_answer_costs_no_job(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """The end of the body is waited for only briefly after the answer's end: an engine
    that holds it open delays nothing, fails nothing, and the next job still runs."""
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, backend=backend, knobs=Knobs(linger=3600))
        async with net.client() as c:
            for n in range(2):
                r = await c.post("/v1/chat/completions", json=chat(f"ask {n}"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"You said: ask {n}"
        await wait_for(lambda: len(net.settled) == 2)
        # The agent gave up on each lingering body: two connections, both let go.
        await wait_for(lambda: net.nodes[0].agent.statistics()["in_flight"] == 0, timeout=5)
        await wait_for(lambda: net.engine.active == 0)  # the engine saw them go
    assert len(set(net.engine.peers)) == 2


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_an_engine_breaking_the_connection_after_the_answer_costs_no_job(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """A connection broken after the answer's end (no clean end of the body) is only a
    connection lost: the job is done, no error follows its done, the node stays."""
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, backend=backend, knobs=Knobs(break_at_end=True)
        )
        link = next(iter(net.gateway.gw.registry.nodes.values()))
        async with net.client() as c:
            for n in range(3):
                r = await c.post("/v1/chat/completions", json=chat(f"ask {n}"))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == f"You said: ask {n}"
        await wait_for(lambda: net.nodes[0].agent.statistics()["in_flight"] == 0)
        assert net.nodes[0].agent.totals.jobs == 3
        assert net.nodes[0].agent.totals.failed == 0
        assert next(iter(net.gateway.gw.registry.nodes.values())) is link
        assert link.closed_reason is None


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_honest_tokens_with_unicode_line_separators_reach_the_client(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """JSON carries U+2028, U+2029 and U+0085 unescaped inside strings (llama.cpp writes
    them raw): a line of the engine's answer ends at its newline, not at those."""
    reply = ["a\u2028b", " c\u0085d", " e\u2029f"]
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, backend=backend, knobs=Knobs(reply=reply, raw_unicode=True)
        )
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("odd characters"))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "".join(reply)
            async with c.stream(
                "POST", "/v1/chat/completions", json=chat("odd characters", stream=True)
            ) as s:
                events, done, _ = await read_sse(s)
            assert done and text_of(events) == "".join(reply)
    assert net.nodes[0].agent.totals.failed == 0


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_an_engine_line_that_never_ends_fails_only_its_job(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    """An engine that starts a line and never ends it fails that job once the line
    passes 16 Mi characters (the agent holds no more than that of it), and the agent
    goes on serving."""
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            backend=backend,
            knobs=Knobs(models=["llama3.1:8b", "endless:1b"], reply=["one", " two"]),
        )
        net.engine.model_knobs["endless:1b"] = Knobs(reply=["one", " two"], endless_line=True)
        agent = net.nodes[0].agent
        async with net.client() as c:
            r = await c.post(
                "/v1/chat/completions", json={**chat("endless"), "model": "endless:1b"}
            )
            assert r.status_code == 502, r.text
            assert "engine sent a line over" in r.text
            r = await c.post("/v1/chat/completions", json=chat("and then"))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "one two"
        assert agent.totals.failed == 1
        assert agent.sessions == 1  # never disconnected
        await wait_for(lambda: net.engine.active == 0)  # the endless answer was let go


async def test_node_killed_before_first_token_fails_over(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, nodes=2, knobs=Knobs(first_delay=0.5), max_jobs=1
        )
        async with net.client() as c:
            async with trio.open_nursery() as inner:
                results: list[httpx.Response] = []

                async def ask() -> None:
                    results.append(await c.post("/v1/chat/completions", json=chat("fail over")))

                inner.start_soon(ask)
                await wait_for(lambda: any(n.agent.statistics()["in_flight"] for n in net.nodes))
                busy = next(n for n in net.nodes if n.agent.statistics()["in_flight"])
                await busy.kill()
            r = results[0]
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "You said: fail over"
    assert list(net.settled.values()) == [1]


async def test_node_killed_mid_stream_ends_with_error_event(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, knobs=Knobs(delay=0.1, repeat=100))
        async with (
            net.client() as c,
            c.stream("POST", "/v1/chat/completions", json=chat("story", stream=True)) as r,
        ):
            events: list[dict[str, Any]] = []
            done = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 3:
                        await net.nodes[0].kill()
        assert not done
        assert "error" in events[-1]
        assert events[-1]["error"]["code"] == "upstream_error"
        assert all(c.get("finish_reason") in (None,) for e in events[:-1] for c in e["choices"])
    await wait_for(lambda: net.settled)
    assert list(net.settled.values()) == [1]


async def test_engine_crash_mid_stream_and_non_stream(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, knobs=Knobs(crash_after=3))
        async with net.client() as c:
            async with c.stream(
                "POST", "/v1/chat/completions", json=chat("a b c d e f", stream=True)
            ) as r:
                events, done, _ = await read_sse(r)
            assert not done
            assert events[-1]["error"]["code"] == "upstream_error"
            r2 = await c.post("/v1/chat/completions", json=chat("a b c d e f"))
            assert_error(r2, 502, "upstream_error")
            rows = await net.gateway.gw.store.read(
                lambda db: [
                    tuple(r) for r in db.execute("SELECT stream, outcome FROM jobs ORDER BY stream")
                ]
            )
            # The streamed failure delivered tokens and is recorded; the non-stream one billed nothing.
            assert rows == [(1, "node_failed")]


async def test_stall_hits_inter_token_timeout(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, knobs=Knobs(stall_after=2), inter_token_timeout="1"
        )
        async with (
            net.client() as c,
            c.stream("POST", "/v1/chat/completions", json=chat("x y z", stream=True)) as r,
        ):
            events, done, comments = await read_sse(r)
        assert not done
        assert events[-1]["error"]["code"] == "upstream_error"
        assert comments  # keep-alive pings while the engine was silent
        await wait_for(lambda: net.engine.aborted)


async def test_slow_first_token_gets_pings(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, knobs=Knobs(first_delay=1.6))
        async with (
            net.client() as c,
            c.stream("POST", "/v1/chat/completions", json=chat("slow model", stream=True)) as r,
        ):
            events, done, comments = await read_sse(r)
        assert done
        assert text_of(events) == "You said: slow model"
        assert len(comments) >= 2
        assert all(c == ": ping" for c in comments)


async def test_heartbeat_loss_evicts(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, nodes=0)
        ws_url = net.url.replace("http://", "ws://") + WS_PATH
        headers = [(NODE_HEADER, "node_silent1"), (SECRET_HEADER, "s" * 32)]
        async with open_gateway_socket(ws_url, headers, max_message_size=1 << 20) as ws:
            await ws.send_message(
                encode(Hello("node_silent1", "0", 1, [ModelInfo("silent:1b")], 1))
            )
            assert decode(await ws.get_message()).type == "welcome"
            assert "node_silent1" in net.gateway.gw.registry.nodes
            started = time.monotonic()
            # Stop reading and writing: trio-websocket still answers pings, so only
            # the application heartbeat can tell the node is gone.
            await wait_for(lambda: "node_silent1" not in net.gateway.gw.registry.nodes, timeout=5)
            assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("gateway_version", [QUIET_GATEWAY_PROTOCOL - 1, QUIET_GATEWAY_PROTOCOL])
async def test_an_agent_finds_a_dead_path_to_its_gateway(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway_version: int
) -> None:
    """From protocol 4 the gateway answers no heartbeat: an idle agent stays connected
    (with a heartbeat, it pings the gateway that has been quiet for five intervals, and
    the gateway's server answers). An older gateway answers each heartbeat. Either way,
    when the path goes dead without closing (here a relay that takes every byte and
    passes none on, so even the kernel's acknowledgements keep coming), the agent
    reconnects (intervals of 0.5 s here), and its jobs run again."""
    monkeypatch.setattr(session, "PROTOCOL_VERSION", gateway_version)
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=0)
        relay = await start_relay(nursery, net.url)
        node = await start_node(nursery, relay.url, net.engine)
        link = net.gateway.gw.registry.nodes[node.id]
        assert link.protocol_version == node.agent.protocol_version == gateway_version
        await trio.sleep(4)  # eight intervals with no job
        assert node.agent.sessions == 1 and relay.accepted == 1
        assert net.gateway.gw.registry.nodes[node.id] is link
        relay.freeze()
        lost = time.monotonic()
        await wait_for(lambda: node.agent.sessions == 2 and node.agent.connected, timeout=5)
        # Protocol 4: 2.5 s of quiet (five intervals), the next heartbeat's ping (<= 0.5 s
        # later), 1 s to wait for the pong (its floor); protocol 3: 1.5 s of silence.
        # Then the backoff (<= 0.5 s). A close handshake would add 2 s.
        assert time.monotonic() - lost < 4.5
        assert relay.accepted == 2
        await wait_for(lambda: link.closed_reason is not None, timeout=5)  # heartbeats lost
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("after the dead path"))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "You said: after the dead path"


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
async def test_the_kernel_drops_a_path_that_stops_acknowledging_three_heartbeats(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead host or path (no acknowledgement of what the agent sends) is dropped by the
    kernel after three heartbeat intervals: 10 s each until the gateway says otherwise,
    then the gateway's (0.5 s here, so the 5 s floor)."""
    opened: list[trio.SocketStream] = []
    open_tcp_stream = trio.open_tcp_stream

    async def recording(*args: Any, **kwargs: Any) -> trio.SocketStream:
        stream = await open_tcp_stream(*args, **kwargs)
        opened.append(stream)
        return stream

    def user_timeouts() -> list[int]:
        """Of the agent's open connections to the gateway (through the relay)."""
        return [
            s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            for s in opened
            if s.socket.fileno() != -1 and s.socket.getpeername()[1] == port
        ]

    monkeypatch.setattr(trio, "open_tcp_stream", recording)
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=0)
        relay = await start_relay(nursery, net.url)
        port = int(relay.url.rsplit(":", 1)[1])
        node = await start_node(nursery, relay.url, net.engine)
        assert user_timeouts() == [30_000]
        relay.freeze()  # then the agent reconnects, knowing the gateway's interval
        await wait_for(lambda: node.agent.sessions == 2 and node.agent.connected, timeout=10)
        assert user_timeouts() == [5_000]


# Anything a gateway may put in a welcome's heartbeat_interval (JSON carries NaN and
# Infinity too, as Python writes them).
welcome_intervals = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0.05, max_value=4000),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=15, deadline=None)
@given(interval=welcome_intervals)
# The values that mattered: 0 made the agent beat in a tight loop, a negative one
# stopped it on trio.sleep's ValueError.
@example(interval=-5.0)
@example(interval=0.0)
@example(interval=1e-9)
@example(interval=0.09)
@example(interval=3601.0)
@example(interval=1e300)
def test_an_agent_survives_any_heartbeat_interval_a_gateway_sends(interval: Any) -> None:
    """A welcome's heartbeat interval outside 0.1-3600 s (or not a number) is a
    protocol violation: the agent neither spins nor stops; it keeps reconnecting with
    its backoff and never counts a session. Within the range it runs the session."""
    trio.run(_agent_welcomed_with, interval)


async def _agent_welcomed_with(interval: Any) -> None:
    attempts: list[dict[str, Any]] = []

    async def hostile(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        attempts.append(json.loads(await ws.get_message()))
        welcome = {"type": "welcome", "node_id": attempts[-1]["node_id"]}
        welcome |= {"protocol_version": 4, "payout_threshold_sats": 1000}
        await ws.send_message(json.dumps(welcome | {"heartbeat_interval": interval}))
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()  # until the agent leaves

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket, hostile, "127.0.0.1", 0, ssl_context=None
            )
        )
        engine = await start_engine(nursery)
        async with httpx.AsyncClient() as client:
            agent = Agent(
                gateway=f"http://127.0.0.1:{server.port}",
                identity=Identity("node_" + "a" * 12, "s" * 32),
                engine=OllamaEngine(engine.url, client),
            )
            ended: list[BaseException | None] = []

            async def run() -> None:
                try:
                    await agent.run()
                except BaseException as exc:
                    ended.append(exc)
                    raise
                ended.append(None)

            with trio.fail_after(20):
                async with trio.open_nursery() as running:
                    running.start_soon(run)
                    await wait_for(lambda: len(attempts) >= 2 or agent.sessions, timeout=10)
                    await trio.sleep(0.3)
                    assert ended == []  # the agent is alive
                    low, high = HEARTBEAT_INTERVAL_RANGE
                    if agent.sessions:
                        assert agent.connected and len(attempts) == 1
                        assert low <= agent.heartbeat_interval <= high
                    else:  # still trying, never in a session
                        assert len(attempts) >= 2 and not agent.connected
                    running.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_wrong_secret_for_known_id_is_refused(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, nodes=1)
        owner = net.nodes[0].agent.identity
        thief = Identity(owner.node_id, "a-different-secret-of-enough-length")
        from owlrun.errors import RefusedError

        with pytest.RaisesGroup(
            pytest.RaisesExc(RefusedError, match="wrong secret"),
            flatten_subgroups=True,
            allow_unwrapped=True,
        ):
            await start_node(
                nursery, net.url, net.engine, identity=thief, payout_address="thief@evil.example"
            )
        assert net.gateway.gw.registry.nodes[
            owner.node_id
        ].agent_version  # the owner is still online
        row = await net.gateway.gw.store.read(
            lambda db: db.execute("SELECT payout_address, secret_hash FROM nodes").fetchone()
        )
        assert row["payout_address"] == ""
        assert owner.secret not in row["secret_hash"]


async def test_hostile_nodes_are_disconnected_others_unaffected(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            nodes=1,
            knobs=Knobs(delay=0.05, repeat=10),
            max_frame_bytes=str(1024 * 1024),
        )
        ws_url = net.url.replace("http://", "ws://") + WS_PATH
        async with net.client() as c:

            async def hostile(name: str, payload: Any) -> None:
                headers = [(NODE_HEADER, name), (SECRET_HEADER, "s" * 32)]
                async with open_gateway_socket(
                    ws_url, headers, max_message_size=64 * 1024 * 1024
                ) as ws:
                    await ws.send_message(encode(Hello(name, "0", 1, [ModelInfo("evil:1b")], 1)))
                    assert decode(await ws.get_message()).type == "welcome"
                    # Closed as soon as the gateway has read enough: a message over the
                    # limit is refused while it is still being written.
                    with pytest.raises(trio_websocket.ConnectionClosed):
                        await ws.send_message(payload)
                        while True:
                            await ws.get_message()

            legit = net.nodes[0]
            async with trio.open_nursery() as inner:
                outputs: list[str] = []

                async def legit_stream() -> None:
                    async with c.stream(
                        "POST", "/v1/chat/completions", json=chat("still fine", stream=True)
                    ) as r:
                        events, done, _ = await read_sse(r)
                        assert done
                        outputs.append(text_of(events))

                inner.start_soon(legit_stream)
                await wait_for(lambda: legit.agent.statistics()["in_flight"] == 1)
                job_id = next(iter(net.gateway.gw.scheduler.jobs))
                await hostile("node_garbage", "this is not json")
                await hostile("node_unknown", json.dumps({"type": "launch_missiles"}))
                await hostile("node_huge", "x" * (2 * 1024 * 1024))
                await hostile(
                    "node_thief",
                    json.dumps(
                        {"type": "chunk", "job_id": job_id, "delta": {"content": "INJECTED"}}
                    ),
                )
                await hostile(
                    "node_badtype",
                    json.dumps({"type": "done", "job_id": 5, "finish_reason": "stop"}),
                )
            assert outputs == ["You said: still fine" * 10]
            assert legit.id in net.gateway.gw.registry.nodes
            assert set(net.gateway.gw.registry.nodes) == {legit.id}


async def test_hundred_concurrent_streams_over_three_nodes(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        # Each stream waits a second for its first token: the hundred are in flight
        # together, more than two nodes' 40 slots, whatever the machine's pace.
        knobs = Knobs(delay=0.01, first_delay=1.0)
        net = await start_network(nursery, tmp_path, nodes=3, knobs=knobs, max_jobs=40)
        results: dict[int, str] = {}
        limits = httpx.Limits(max_connections=200)
        async with net.gateway.client(
            headers={"Authorization": f"Bearer {net.key}"}, limits=limits
        ) as c:

            async def one(i: int) -> None:
                async with c.stream(
                    "POST", "/v1/chat/completions", json=chat(f"request number {i}", stream=True)
                ) as r:
                    assert r.status_code == 200
                    events, done, _ = await read_sse(r)
                    assert done
                    results[i] = text_of(events)

            async with trio.open_nursery() as inner:
                for i in range(100):
                    inner.start_soon(one, i)
        assert results == {i: f"You said: request number {i}" for i in range(100)}
        served = [n.agent.totals.jobs for n in net.nodes]
        assert sum(served) == 100
        assert all(s > 0 for s in served)
    assert len(net.settled) == 100
    assert set(net.settled.values()) == {1}


async def test_queue_waits_for_a_slot_then_times_out(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(
            nursery, tmp_path, max_jobs=1, knobs=Knobs(first_delay=0.3), queue_timeout="1"
        )
        async with net.client() as c:
            answers: list[int] = []

            async def ask() -> None:
                rr = await c.post("/v1/chat/completions", json=chat("q"))
                answers.append(rr.status_code)

            async with trio.open_nursery() as inner:
                for _ in range(3):
                    inner.start_soon(ask)
            # One slot, 0.3 s per job, 1 s of queue: the first ones are served, the last may wait out.
            assert answers.count(200) >= 2
            net.engine.knobs.first_delay = 2.0
            async with trio.open_nursery() as inner:
                inner.start_soon(ask)
                await trio.sleep(0.1)
                r = await c.post("/v1/chat/completions", json=chat("q"))
                assert_error(r, 503, "no_capacity")
                assert "Retry-After" in r.headers


async def test_n_greater_than_one_and_bad_bodies(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path)
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json=chat("x", n=2))
            assert assert_error(r, 400, "invalid_request")["param"] == "n"
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True})
            assert_error(r, 400, "invalid_request")
            assert (await c.post("/v1/chat/completions", json=chat("x", n=1))).status_code == 200


async def test_agent_reconnects_after_gateway_restart(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path)
        node = net.nodes[0]
        net.gateway.stop.set()
        await wait_for(lambda: not node.agent.connected, timeout=10)
        from tests.servers import network_config, start_gateway

        config = network_config(
            tmp_path,
            port=str(int(net.url.rsplit(":", 1)[1])),
            database=net.gateway.config.database,
        )
        again = await start_gateway(nursery, config)
        await wait_for(lambda: node.id in again.gw.registry.nodes, timeout=15)
        async with again.client(headers={"Authorization": f"Bearer {net.key}"}) as c:
            r = await c.post("/v1/chat/completions", json=chat("back again"))
            assert r.json()["choices"][0]["message"]["content"] == "You said: back again"


@pytest.mark.parametrize(
    ("backend", "body", "expected"),
    [
        ("ollama", {"think": True}, {"think": True}),
        ("ollama", {"reasoning_effort": "high"}, {"think": "high"}),
        ("ollama", {"reasoning_effort": "minimal"}, {"think": False}),
        ("openai", {"reasoning_effort": "low"}, {"reasoning_effort": "low"}),
        ("openai", {"think": False}, {"chat_template_kwargs": {"enable_thinking": False}}),
    ],
)
async def test_reasoning_controls_reach_the_engine(
    nursery: trio.Nursery,
    tmp_path: Path,
    backend: str,
    body: dict[str, object],
    expected: dict[str, object],
) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, backend=backend, knobs=Knobs(reasoning=["hm"]))
        async with net.client() as c:
            r = await c.post("/v1/chat/completions", json={**chat("think"), **body})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["reasoning_content"] == "hm"
        sent = net.engine.requests[-1]
        assert {k: sent.get(k) for k in expected} == expected
        async with net.client() as c:
            bad = await c.post(
                "/v1/chat/completions", json={**chat("x"), "reasoning_effort": "max"}
            )
        assert_error(bad, 400, "invalid_request")
