"""Fixtures only; the engines they start live in ``tests/engine/engines.py``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.engines import (
    SMOL,
    SMOL_EMBED,
    TINY,
    Engine,
    python_executable,
    start_engine_server,
)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    workdir = tmp_path_factory.mktemp("tiny")
    model = workdir / "tiny.gguf"
    subprocess.run(
        [python_executable(), str(Path(__file__).parent / "tiny_model.py"), str(model)], check=True
    )
    yield from start_engine_server(model, TINY, workdir)


@pytest.fixture(scope="session")
def smol_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    models = Path(os.environ.get("ROUTECAT_TEST_MODELS", ""))
    model = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.exists(), f"{model} is missing: run these tests with `nox -s engine`"
    yield from start_engine_server(model, SMOL, tmp_path_factory.mktemp("smol"))


@pytest.fixture(scope="session")
def smol_embed_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    models = Path(os.environ.get("ROUTECAT_TEST_MODELS", ""))
    model = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model.exists(), f"{model} is missing: run these tests with `nox -s engine`"
    yield from start_engine_server(
        model, SMOL_EMBED, tmp_path_factory.mktemp("smol_embed"), embedding=True
    )
