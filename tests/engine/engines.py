"""Real engines for the engine tier: llama.cpp's OpenAI-compatible server on a tiny
and a small real model."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx

from routecat.demo import free_port, llama_server_command

TINY = "tiny:test"


SMOL = "smollm2:135m"
# The same SmolLM2 weights in llama.cpp's embedding mode (mean-pooled hidden states):
# no embedding model installs from the package index, so a real model's own
# embeddings stand in for one.
SMOL_EMBED = "smollm2-embed:135m"


@attrs.define
class Engine:
    url: str
    model: str
    process: subprocess.Popen[bytes]


def python_executable() -> str:
    python = os.environ.get("ROUTECAT_TEST_ENGINE_PYTHON", "")
    assert python and Path(python).exists(), (
        "ROUTECAT_TEST_ENGINE_PYTHON must name the python of the engine's environment:"
        " run these tests with `nox -s engine`"
    )
    return python


def start_engine_server(
    model_path: Path, alias: str, workdir: Path, *, embedding: bool = False
) -> Iterator[Engine]:
    port = free_port()
    log = open(workdir / f"{alias.replace(':', '_')}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        llama_server_command(
            python_executable(), str(model_path), alias, port, embedding=embedding
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "engine did not start: " + (workdir / log.name).read_text()[-3000:]
                )
            time.sleep(0.3)
        yield Engine(url, alias, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
