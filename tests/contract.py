"""The API contract, checked against a live gateway: schemathesis 4 runs
``docs/openapi.yaml`` (every check; coverage, fuzzing and stateful phases) against a
real ``routecat serve`` with a bench node behind it, and must find nothing: no 5xx,
no schema-valid request rejected, no undocumented status, no response that breaks its
schema. ``nox -s contract`` (in ``.ci/run``) runs it.

    python -m tests.contract [--max-examples N] [schemathesis options...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def wait_for_line(log: Path, marker: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if marker in text:
            return text
        time.sleep(0.05)
    raise RuntimeError(f"{log} never said {marker!r}:\n{log.read_text()[-2000:]}")


def main(argv: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="routecat-contract-"))
    env = {
        **os.environ,
        "ROUTECAT_DATABASE": str(tmp / "contract.db"),
        "ROUTECAT_PORT": "0",
        "ROUTECAT_BTC_USD": "100000",
        # The fuzzer sends thousands of requests from one address with one key.
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000000",
        "ROUTECAT_READ_LIMIT_PER_MINUTE": "100000000",
        "ROUTECAT_REGISTER_LIMIT_PER_HOUR": "100000000",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp / "gateway.log"
    with open(log, "wb") as out:
        gateway = subprocess.Popen([sys.executable, "-m", "routecat", "serve"], env=env, stderr=out)
    node = None
    try:
        url = wait_for_line(log, "listening on ").rsplit("listening on ", 1)[1].split()[0]
        node_log = tmp / "node.log"
        with open(node_log, "wb") as out:
            node = subprocess.Popen(
                [sys.executable, "-m", "tests.bench_node", url], env=env, stdout=out, cwd=ROOT
            )
        wait_for_line(node_log, "READY")
        key = httpx.post(f"{url}/v1/auth/register", json={"name": "contract"}).json()["api_key"]
        args = argv or ["--max-examples", "100"]
        done = subprocess.run(
            [
                "schemathesis",
                "run",
                str(ROOT / "docs" / "openapi.yaml"),
                "--url",
                url,
                "-H",
                f"Authorization: Bearer {key}",
                "--checks",
                "all",
                *args,
            ],
            check=False,
            cwd=tmp,  # its cache and reports stay out of the checkout
        )
        return done.returncode
    finally:
        for proc in (node, gateway):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
