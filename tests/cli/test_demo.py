"""``routecat demo`` as a process, in front of the fake engine (the engine session runs
it on real llama.cpp): the banner, a funded key that works with the openai SDK, the
jobs billed and audited, and Ctrl-C stopping everything."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from routecat.demo import DEMO_SATS, Progress, run_step
from routecat.errors import DemoError
from tests.demo_process import start_demo
from tests.fakes import Knobs, start_engine
from tests.procs import alive


async def test_the_demo_serves_a_funded_key_and_stops_on_ctrl_c(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(60):
        # A model outside the free catalog: the demo key pays for it from its top-up.
        engine = await start_engine(nursery, Knobs(models=["demo-model:1b"]))
        demo = await start_demo(nursery, tmp_path, "--backend-url", engine.url, ready_within=30)
        assert demo.model == "demo-model:1b"  # what the engine serves, listed by the gateway
        # The printed curl command's body is the documented request.
        body = re.search(r"-d '(.+)'", demo.text)
        assert body is not None and json.loads(body[1])["model"] == demo.model
        client = openai.AsyncOpenAI(base_url=demo.url + "/v1", api_key=demo.key, max_retries=0)
        r = await client.chat.completions.create(
            model=demo.model, messages=[{"role": "user", "content": "hello there"}]
        )
        assert r.choices[0].message.content == "You said: hello there"
        stream = await client.chat.completions.create(
            model=demo.model, messages=[{"role": "user", "content": "and again"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "You said: and again"
        await client.close()
        async with httpx.AsyncClient(base_url=demo.url) as c:
            auth = {"Authorization": f"Bearer {demo.key}"}

            async def audited() -> dict[str, Any]:
                found: dict[str, Any] = (await c.get("/v1/audit")).json()
                return found

            while (await audited())["total"] < 2:  # settled just after each answer
                await trio.sleep(0.1)
            audit = await audited()
            balance = (await c.get("/v1/auth/balance", headers=auth)).json()
            network = (await c.get("/network")).text
        assert audit["total"] == 2 and {j["model"] for j in audit["jobs"]} == {demo.model}
        # Funded by the dev wallet, then billed for both jobs (not free: it has a balance).
        assert 0 < DEMO_SATS * 1000 - balance["balance_msat"] < 1000 * 1000
        assert "Jobs per hour" in network
        assert await demo.interrupt(within=10) == 0
        await demo.ended.wait()
        assert demo.lines[-1] == "stopped"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_ctrl_c_stops_the_engine_child(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The engine child (here a stand-in: a fake OpenAI server in its own process, from a
    prepared cache) is gone within 10 s of Ctrl-C."""
    cache = tmp_path / "cache"
    engine_dir = cache / "engine" / "bin"
    engine_dir.mkdir(parents=True)
    # A "built" engine whose python runs the fake engine as llama_cpp.server would run.
    python = engine_dir / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -m tests.fake_llama_server "$@"\n')
    python.chmod(0o755)
    (cache / "engine" / ".ready-0.3.36").touch()
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    with trio.fail_after(60):
        demo = await start_demo(
            nursery,
            tmp_path,
            "--model-file",
            str(model),
            cache=cache,
            ready_within=30,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        children = demo.descendants()
        assert children and all(alive(pid) for pid in children)
        assert f"pid {min(children)}" in demo.text or any(f"pid {p}" in demo.text for p in children)
        assert await demo.interrupt(within=10) == 0
        assert not [pid for pid in children if alive(pid)]


def test_a_failed_first_run_step_says_why(tmp_path: Path) -> None:
    """A build that fails is reported with the end of its log, not a traceback."""
    out = (tmp_path / "out.txt").open("w")
    script = "print('[ 50%] Building CXX object ggml.o'); print('error: no compiler'); exit(3)"
    with pytest.raises(DemoError) as failed:
        run_step(
            [sys.executable, "-c", script],
            tmp_path / "build.log",
            Progress("building llama.cpp", out),
        )
    assert "building llama.cpp failed (exit status 3)" in str(failed.value)
    assert "error: no compiler" in str(failed.value)
    out.close()


def test_a_build_that_cannot_work_says_why_and_what_to_do(tmp_path: Path) -> None:
    """No package index (pip fails at once): the demo exits 1 with the build's error and
    how to use an engine already running, not a traceback; nothing is left half-ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    cache = tmp_path / "cache"
    done = subprocess.run(
        [sys.executable, "-m", "routecat", "demo", "--port", "0", "--cache-dir", str(cache),
         "--database", str(tmp_path / "demo.db")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "building llama.cpp failed" in done.stderr
    assert "routecat demo --backend-url" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((cache / "engine").glob(".ready-*"))  # the next run builds again
