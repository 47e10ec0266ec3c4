"""Sessions: lint, typecheck and tests run by default (the README's test command);
e2e drives real external components; bench measures (never part of the default set)."""

from __future__ import annotations

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
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", *PACKAGES)


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not e2e", *session.posargs)


@nox.session
def e2e(session: nox.Session) -> None:
    """Real external components: Node.js SDK clients (npm ci from the lock file) and the
    web pages in Debian's chromium (installed by .ci/run; never a downloaded browser)."""
    session.install("-e", ".[test,browser]")
    session.run("npm", "ci", "--no-audit", "--no-fund", "--prefix", "tests/e2e/js", external=True)
    session.run("pytest", "-m", "e2e", "--ignore=tests/e2e/test_lnbits.py", *session.posargs)


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


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.bench", *session.posargs)
