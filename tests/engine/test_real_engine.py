"""owlrun in front of a real llama.cpp engine (llama-cpp-python's server), end to end."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tests.clients import ask_both_ways, read_sse, text_of
from tests.engine.engines import SMOL, SMOL_EMBED, TINY, Engine
from tests.fakes import FakeEngine
from tests.servers import Network, start_network, start_node

pytestmark = pytest.mark.e2e

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


async def network_for(
    nursery: trio.Nursery, tmp_path: Path, engine: Engine, **overrides: Any
) -> Network:
    net = await start_network(
        nursery,
        tmp_path,
        nodes=0,
        first_token_timeout="60",
        inter_token_timeout="30",
        queue_timeout="120",
        **overrides,
    )
    # The real engine: owlrun with --backend openai, one job at a time (this server is serial).
    node = await start_node(
        nursery, net.url, FakeEngine(url=engine.url), backend="openai", max_jobs=1
    )
    net.nodes.append(node)
    return net


def tiny_chat(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": TINY,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "seed": 1,
        **extra,
    }


async def direct_stream(engine: Engine, body: dict[str, Any]) -> str:
    async with (
        httpx.AsyncClient(base_url=engine.url, timeout=120) as c,
        c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r,
    ):
        events, _, _ = await read_sse(r)
    return text_of(events)


async def test_smollm2_answers_through_the_gateway(
    nursery: trio.Nursery, tmp_path: Path, smol_engine: Engine
) -> None:
    with trio.fail_after(300):
        net = await network_for(nursery, tmp_path, smol_engine)
        client = openai.AsyncOpenAI(
            base_url=net.url + "/v1", api_key=net.key, max_retries=0, timeout=120
        )
        models = [m.id async for m in client.models.list()]
        assert models == [SMOL]  # exactly what the engine serves
        question = [
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ]
        r, text = await ask_both_ways(client, SMOL, question)
        assert "Paris" in (r.choices[0].message.content or "")
        assert r.usage is not None and r.usage.completion_tokens > 0
        assert "Paris" in text
        await client.close()


async def test_tiny_model_exact_content_and_max_tokens(
    nursery: trio.Nursery, tmp_path: Path, tiny_engine: Engine
) -> None:
    with trio.fail_after(300):
        net = await network_for(nursery, tmp_path, tiny_engine)
        body = tiny_chat("hello routecat", max_tokens=24)
        expected = await direct_stream(tiny_engine, body)
        assert expected  # deterministic gibberish, but not nothing
        async with net.client() as c:
            async with c.stream(
                "POST",
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
            ) as r:
                events, done, _ = await read_sse(r)
            assert done
            assert text_of(events) == expected
            assert [e["choices"][0]["finish_reason"] for e in events if e.get("choices")][
                -1
            ] == "length"
            streamed_usage = events[-1]["usage"]
            r2 = await c.post("/v1/chat/completions", json=body)
            assert r2.json()["choices"][0]["message"]["content"] == expected
            # max_completion_tokens is honoured too (this engine ignores it: owlrun maps it).
            r3 = await c.post(
                "/v1/chat/completions",
                json={**tiny_chat("hello routecat"), "max_completion_tokens": 5},
            )
            assert r3.json()["usage"]["completion_tokens"] <= 6
            assert r3.json()["choices"][0]["finish_reason"] == "length"
        # Billed usage agrees with the engine's own non-stream count.
        async with httpx.AsyncClient(base_url=tiny_engine.url, timeout=120) as d:
            own = (await d.post("/v1/chat/completions", json=body)).json()["usage"]
        assert own["completion_tokens"] == 24
        # This engine sends no usage when streaming: owlrun counted what it streamed.
        assert streamed_usage["completion_tokens"] == own["completion_tokens"]
        # (The prompt's count is checked with SmolLM2's real tokenizer: this vocabulary
        # spells the template's role names byte by byte, unlike any real model.)


async def test_disconnect_stops_generation_and_frees_the_engine(
    nursery: trio.Nursery, tmp_path: Path, tiny_engine: Engine
) -> None:
    with trio.fail_after(300):
        net = await network_for(nursery, tmp_path, tiny_engine)
        async with net.client() as c:
            async with c.stream(
                "POST",
                "/v1/chat/completions",
                json=tiny_chat("a long story", max_tokens=1900, stream=True),
            ) as r:
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                    if seen >= 20:
                        break
            await trio.sleep(1.0)  # the cancel reaches the engine
            before = cpu_seconds(tiny_engine.process.pid)
            await trio.sleep(1.0)
            idle = cpu_seconds(tiny_engine.process.pid) - before
            assert idle < 0.3, f"the engine kept generating ({idle:.2f} s of CPU in 1 s)"
            started = time.monotonic()
            r2 = await c.post("/v1/chat/completions", json=tiny_chat("next please", max_tokens=8))
            assert r2.status_code == 200
            assert r2.json()["usage"]["completion_tokens"] >= 7
            assert time.monotonic() - started < 20


async def test_concurrent_clients_all_answered(
    nursery: trio.Nursery, tmp_path: Path, tiny_engine: Engine
) -> None:
    with trio.fail_after(300):
        net = await network_for(nursery, tmp_path, tiny_engine)
        prompts = [f"client number {i} says hi" for i in range(5)]
        expected = {
            p: await direct_stream(tiny_engine, tiny_chat(p, max_tokens=16)) for p in prompts
        }
        results: dict[str, str] = {}
        async with net.client() as c:

            async def ask(prompt: str) -> None:
                async with c.stream(
                    "POST",
                    "/v1/chat/completions",
                    json=tiny_chat(prompt, max_tokens=16, stream=True),
                ) as r:
                    events, done, _ = await read_sse(r)
                    assert done
                    results[prompt] = text_of(events)

            async with trio.open_nursery() as inner:
                for p in prompts:
                    inner.start_soon(ask, p)
        assert results == expected
        assert json.dumps(results)  # all distinct clients got their own answer


BOUND_CASES: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": ""}], "max_tokens": 8},
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."},
            {"role": "assistant", "content": "Red, green, blue."},
            {"role": "user", "content": "Three more, in French: éèà ü 日本"},
        ]
    },
    {
        "messages": [{"role": "user", "content": "Reply in JSON with a key 'a'."}],
        "response_format": {"type": "json_object"},
        "max_tokens": 24,
    },
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
    },
]


@pytest.mark.parametrize("case", BOUND_CASES)
async def test_real_engine_counts_stay_within_the_bounds(
    nursery: trio.Nursery, tmp_path: Path, smol_engine: Engine, case: dict[str, Any]
) -> None:
    """DESIGN section 3: an honest engine never exceeds the prompt and completion bounds,
    so its node is never penalised; checked against llama.cpp's own counts."""
    from routecat.money.usage import completion_bound
    from routecat.network.measure import measure_prompt

    body = {"model": SMOL, "temperature": 0, "seed": 1, "max_tokens": 48, **case}
    with trio.fail_after(300):
        async with httpx.AsyncClient(base_url=smol_engine.url, timeout=120) as c:
            r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        message = r.json()["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        delivered = len((message.get("content") or "").encode()) + sum(
            len(call["function"]["name"].encode()) + len(call["function"]["arguments"].encode())
            for call in calls
        )
        prompt = measure_prompt("chat", body)
        assert usage["prompt_tokens"] <= prompt.bound, (usage, prompt)
        assert usage["completion_tokens"] <= completion_bound(
            body["max_tokens"], delivered, len(calls)
        ), (usage, delivered)
        # The same request through gateway + owlrun: billed what the engine counted, and
        # the node keeps its reputation.
        net = await network_for(nursery, tmp_path, smol_engine)
        async with net.client() as c:
            through = await c.post("/v1/chat/completions", json=body)
        assert through.status_code == 200, through.text
        assert net.gateway.gw.reputation.penalties == {}


async def test_real_embeddings_through_the_gateway(
    nursery: trio.Nursery, tmp_path: Path, smol_embed_engine: Engine
) -> None:
    """A real model's embeddings (llama.cpp, SmolLM2-135M mean-pooled): one vector per
    input of the model's width, close texts closer than unrelated ones, and the engine's
    own token count billed within the byte bound."""
    import math

    import openai

    with trio.fail_after(120):
        net = await network_for(nursery, tmp_path, smol_embed_engine)
        client = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)
        texts = [
            "The cat sleeps on the warm sofa.",
            "A cat is sleeping on a cosy couch.",
            "Quarterly revenue grew by twelve percent.",
        ]
        r = await client.embeddings.create(model=SMOL_EMBED, input=texts)
        vectors = [d.embedding for d in r.data]
        assert [len(v) for v in vectors] == [576] * 3  # SmolLM2-135M's hidden size

        def cosine(a: list[float], b: list[float]) -> float:
            dot = sum(x * y for x, y in zip(a, b, strict=True))
            return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

        assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
        assert 0 < r.usage.prompt_tokens <= sum(len(t.encode()) + 4 for t in texts)
        await client.close()
