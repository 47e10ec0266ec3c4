"""``POST /v1/responses`` with the official SDK: text, streams with the documented
event sequence, function-call round trips, reasoning items, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.clients import MODEL
from tests.fakes import Knobs
from tests.servers import assert_error, catalog, ledger_ok, start_network


def sdk(net: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)  # type: ignore[attr-defined]


async def test_text_response_and_stream_events(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, catalog=catalog(tmp_path))
        client = sdk(net)
        r = await client.responses.create(
            model=MODEL, input="hello there", instructions="be brief", max_output_tokens=200
        )
        assert r.status == "completed" and r.id.startswith("resp_")
        assert r.output_text == "You said: hello there"
        assert r.usage is not None and r.usage.output_tokens == 4
        assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + 4
        sent = net.engine.requests[-1]
        assert [m["role"] for m in sent["messages"]] == ["system", "user"]
        assert sent["messages"][0]["content"] == "be brief"
        # The stream: the documented sequence, numbered, no [DONE].
        events = [
            e
            async for e in await client.responses.create(
                model=MODEL, input=[{"role": "user", "content": "stream me please"}], stream=True
            )
        ]
        kinds = [e.type for e in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert "response.output_text.delta" in kinds
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "You said: stream me please"
        final = events[-1].response
        assert final.output_text == text and final.usage.output_tokens == 5
        # The stream() helper of the SDK.
        async with client.responses.stream(model=MODEL, input="helper") as stream:
            async for _ in stream:
                pass
            done = await stream.get_final_response()
        assert done.output_text == "You said: helper"
        async with net.client() as c:
            raw = await c.post(
                "/v1/responses", json={"model": MODEL, "input": "raw", "stream": True}
            )
        assert "[DONE]" not in raw.text and raw.text.count("event: response.completed") == 1
        await client.close()
        await ledger_ok(net)


async def test_function_call_round_trip(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            knobs=Knobs(
                reply=[], tool_call={"name": "get_weather", "arguments": {"city": "Paris"}}
            ),
        )
        client = sdk(net)
        tools = [
            {
                "type": "function",
                "name": "get_weather",
                "description": "the weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ]
        r = await client.responses.create(model=MODEL, input="weather in Paris?", tools=tools)  # type: ignore[arg-type]
        (call,) = [item for item in r.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        assert net.engine.requests[-1]["tools"][0]["function"]["name"] == "get_weather"
        stream = await client.responses.create(
            model=MODEL,
            input="weather in Paris?",
            tools=tools,
            stream=True,  # type: ignore[arg-type]
        )
        events = [e async for e in stream]
        kinds = [e.type for e in events]
        assert "response.function_call_arguments.delta" in kinds
        assert "response.function_call_arguments.done" in kinds
        added = next(e for e in events if e.type == "response.output_item.done")
        assert added.item.type == "function_call" and added.item.name == "get_weather"
        # The answer to the call goes back as items; the engine gets a tool message.
        net.engine.knobs.tool_call = None
        net.engine.knobs.reply = ["It is 21."]
        r2 = await client.responses.create(
            model=MODEL,
            tools=tools,  # type: ignore[arg-type]
            input=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": call.call_id,
                    "name": call.name,
                    "arguments": call.arguments,
                },
                {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'},
            ],
        )
        assert r2.output_text == "It is 21."
        sent = net.engine.requests[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        # (Ollama's own message format: its tool calls carry no ids.)
        assert sent[1]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert sent[2]["role"] == "tool" and sent[2]["content"] == '{"temp": 21}'
        await client.close()


async def test_reasoning_items_and_tokens(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, knobs=Knobs(reasoning=["Let me ", "think."]))
        client = sdk(net)
        r = await client.responses.create(
            model=MODEL,
            input="why?",
            reasoning={"effort": "high"},  # type: ignore[arg-type]
        )
        kinds = [item.type for item in r.output]
        assert kinds == ["reasoning", "message"]
        assert r.output[0].content[0].text == "Let me think."  # type: ignore[union-attr,index]
        assert (
            r.usage is not None
            and 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
        )
        assert net.engine.requests[-1]["think"] == "high"
        events = [
            e async for e in await client.responses.create(model=MODEL, input="why?", stream=True)
        ]
        kinds = [e.type for e in events]
        assert "response.reasoning_text.delta" in kinds
        assert kinds.index("response.reasoning_text.done") < kinds.index(
            "response.output_text.delta"
        )
        await client.close()


async def test_limits_and_refusals(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, knobs=Knobs(reply=["a"] * 10))
        client = sdk(net)
        r = await client.responses.create(model=MODEL, input="long", max_output_tokens=3)
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
        async with net.client() as c:
            for body, param in (
                ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
                ({"input": []}, "input"),
                ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
                ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
            ):
                bad = await c.post("/v1/responses", json={"model": MODEL, **body})
                assert_error(bad, 400, "invalid_request")
                assert bad.json()["error"]["param"] == param
            assert_error(
                await c.post("/v1/responses", json={"model": "nope:1b", "input": "x"}),
                404,
                "model_not_found",
            )
        with pytest.raises(openai.BadRequestError):
            await client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
        await client.close()
    assert httpx  # the raw client is used above for what the SDK refuses to send
