"""``POST /v1/embeddings`` end to end: the official SDK, both engine kinds, billing per
input token within the byte bound, and hostile or wrong answers from a node."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

import openai
import pytest
import trio

from tests.fakes import Knobs, fake_tokens, fake_vector
from tests.servers import assert_error, catalog, ledger_ok, start_network

EMBED = "nomic-embed-text:v1.5"


@pytest.mark.parametrize("backend", ["ollama", "openai"])
async def test_sdk_embeddings_float_and_base64_billed_per_input_token(
    nursery: trio.Nursery, tmp_path: Path, backend: str
) -> None:
    with trio.fail_after(30):
        net = await start_network(
            nursery,
            tmp_path,
            backend=backend,
            catalog=catalog(tmp_path),
            free_daily_requests="0",
            knobs=Knobs(models=["llama3.1:8b", EMBED]),
        )
        async with net.client() as c:
            kinds = {
                m["id"]: m["routecat_kind"] for m in (await c.get("/v1/models")).json()["data"]
            }
        # Ollama says so in /api/show; an OpenAI-compatible engine's model says it in its name.
        assert kinds == {"llama3.1:8b": "chat", EMBED: "embedding"}
        client = openai.AsyncOpenAI(base_url=net.url + "/v1", api_key=net.key, max_retries=0)
        texts = ["the cat sat", "on the mat, héhé"]
        r = await client.embeddings.create(model=EMBED, input=texts)
        assert [d.embedding for d in r.data] == [
            pytest.approx(fake_vector(t), abs=1e-6) for t in texts
        ]
        assert [d.index for d in r.data] == [0, 1]
        tokens = sum(fake_tokens(t) for t in texts)
        assert r.usage.prompt_tokens == tokens and r.usage.total_tokens == tokens
        # The SDK's default asks base64 and decodes it itself; raw base64 on request too.
        raw = await client.embeddings.with_raw_response.create(
            model=EMBED, input="one", encoding_format="base64", dimensions=4
        )
        body = raw.http_response.json()
        vector = struct.unpack("<4f", base64.b64decode(body["data"][0]["embedding"]))
        assert list(vector) == pytest.approx(fake_vector("one", 4), abs=1e-6)
        assert net.engine.requests[-1]["dimensions"] == 4
        cost = int(raw.http_response.headers["X-RouteCat-Cost-Msat"])
        # Not in the catalog: its default price, $500 per 1M input tokens, 500 msat each.
        assert cost == body["usage"]["cost_msat"] == fake_tokens("one") * 500
        await client.close()
        async with net.client() as c:
            audit = (await c.get("/v1/auth/usage")).json()
        assert [j["kind"] for j in audit["data"]] == ["embedding", "embedding"]
        assert all(j["tokens_out"] == 0 for j in audit["data"])
        await ledger_ok(net)


async def test_token_arrays_and_what_ollama_cannot_embed(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, backend="openai", knobs=Knobs(models=[EMBED]))
        async with net.client() as c:
            r = await c.post("/v1/embeddings", json={"model": EMBED, "input": [[1, 2, 3], [4]]})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["prompt_tokens"] == 4  # a token array is its own count
            one = await c.post("/v1/embeddings", json={"model": EMBED, "input": [5, 6]})
            assert one.status_code == 200 and len(one.json()["data"]) == 1
    (tmp_path / "o").mkdir()
    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path / "o", backend="ollama", knobs=Knobs(models=[EMBED])
        )
        async with net.client() as c:
            r = await c.post("/v1/embeddings", json={"model": EMBED, "input": [[1, 2, 3]]})
        assert_error(r, 502, "upstream_error")
        assert "text only" in r.json()["error"]["message"]


BAD = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": [[1, -2]]}, "input"),
    ({"input": [["a"]]}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"model": "", "input": "a"}, "model"),
]


async def test_bad_embedding_requests_are_400(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(20):
        net = await start_network(nursery, tmp_path, knobs=Knobs(models=[EMBED]))
        async with net.client() as c:
            for body, param in BAD:
                r = await c.post("/v1/embeddings", json={"model": EMBED, **body})
                assert_error(r, 400, "invalid_request")
                assert r.json()["error"]["param"] == param, (body, r.json())
        assert net.engine.requests == []


async def test_a_node_over_reporting_or_sending_bad_vectors_is_not_trusted(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from owlrun.protocol import Embedded, Usage, encode
    from tests.clients import MODEL
    from tests.rogue import rogue_node

    with trio.fail_after(30):
        net = await start_network(
            nursery, tmp_path, catalog=catalog(tmp_path), free_daily_requests="0", nodes=0
        )
        async with rogue_node(net.url, protocol_version=3, models=[{"name": EMBED}]) as rogue:

            async def answer(vectors: list[str], usage: Usage) -> None:
                job = await rogue.next_job()
                assert job.kind == "embedding"
                await rogue.send(encode(Embedded(job.job_id, vectors, usage)))

            good = base64.b64encode(struct.pack("<2f", 0.5, 0.25)).decode()
            nan = base64.b64encode(struct.pack("<2f", float("nan"), 1.0)).decode()
            link = net.gateway.gw.registry.nodes[rogue.node_id]
            async with net.client() as c:
                # A NaN in a vector: the job fails (not billed), the client gets an error.
                async with trio.open_nursery() as inner:
                    inner.start_soon(answer, [nan], Usage(2, 0))
                    bad = await c.post("/v1/embeddings", json={"model": EMBED, "input": "xyz"})
                assert bad.status_code in (502, 503), bad.text
                assert link.failures == 1  # blamed
                link.cooldown_until = 0.0  # the test does not wait out the cooldown
                # Claims a million tokens for "abc": billed at the bound, 3 bytes + 4.
                async with trio.open_nursery() as inner:
                    inner.start_soon(answer, [good], Usage(1_000_000, 0))
                    r = await c.post("/v1/embeddings", json={"model": EMBED, "input": "abc"})
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["prompt_tokens"] == 3 + 4
                assert r.json()["data"][0]["embedding"] == [0.5, 0.25]
                audit = (await c.get("/v1/auth/usage")).json()
        assert audit["total"] == 1  # only the good one was billed
        assert MODEL  # the chat model is untouched by any of this
        await ledger_ok(net)
