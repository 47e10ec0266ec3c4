"""A real LNbits (FakeWallet backend) for the Lightning tests, in its own virtualenv.

The virtualenv is made by ``nox -s lnbits`` (LNbits pins pydantic v1: never mixed into
the project's environment) and named by ``ROUTECAT_TEST_LNBITS`` (its ``lnbits``
executable). The server runs in its own process group on loopback and is stopped as a
group; a server that never answers fails the tests loudly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx


@attrs.define
class Wallet:
    id: str
    adminkey: str
    inkey: str
    address_name: str


@attrs.define
class LNbits:
    url: str
    super_token: str
    process: subprocess.Popen[bytes]

    def wallet(self, name: str) -> Wallet:
        r = httpx.post(f"{self.url}/api/v1/account", json={"name": name}, timeout=30)
        r.raise_for_status()
        data = r.json()
        return Wallet(data["id"], data["adminkey"], data["inkey"], data["lightning_address"])

    def fund(self, wallet: Wallet, sats: int) -> None:
        r = httpx.put(
            f"{self.url}/users/api/v1/balance",
            json={"id": wallet.id, "amount": sats},
            headers={"Authorization": f"Bearer {self.super_token}"},
            timeout=30,
        )
        r.raise_for_status()

    def balance_msat(self, wallet: Wallet) -> int:
        r = httpx.get(f"{self.url}/api/v1/wallet", headers={"X-Api-Key": wallet.inkey}, timeout=30)
        r.raise_for_status()
        return int(r.json()["balance"])

    def pay(self, wallet: Wallet, bolt11: str) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/api/v1/payments",
            json={"out": True, "bolt11": bolt11},
            headers={"X-Api-Key": wallet.adminkey},
            timeout=60,
        )
        assert r.status_code in (200, 201), r.text
        body = dict(r.json())
        assert body.get("status", "success") != "failed", body
        return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_lnbits(workdir: Path) -> Iterator[LNbits]:
    executable = os.environ.get("ROUTECAT_TEST_LNBITS")
    assert executable and Path(executable).exists(), (
        "ROUTECAT_TEST_LNBITS must name the lnbits executable of its own virtualenv:"
        " run these tests with `nox -s lnbits`"
    )
    package = subprocess.run(
        [
            str(Path(executable).parent / "python"),
            "-c",
            "import lnbits, os; print(os.path.dirname(lnbits.__file__))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (workdir / "data").mkdir()
    (workdir / "ext").mkdir()
    (workdir / "lnbits").symlink_to(package)
    port = _free_port()
    env = {
        **os.environ,
        "LNBITS_BACKEND_WALLET_CLASS": "FakeWallet",
        "LNBITS_DATA_FOLDER": str(workdir / "data"),
        "LNBITS_EXTENSIONS_PATH": str(workdir / "ext"),
        "LNBITS_ADMIN_UI": "true",
        "SUPER_USER": secrets.token_hex(16),
        "LNBITS_PRICE_AGGREGATOR_ENABLED": "false",
        "LNBITS_CALLBACK_URL_RULES": '["http://127\\\\.0\\\\.0\\\\.1(:\\\\d+)?"]',
        "LNBITS_CALLBACK_ALLOW_PRIVATE_IPS": "true",
        "LNBITS_LNURL_ALLOW_PRIVATE_IPS": "true",
    }
    log = open(workdir / "lnbits.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [executable, "--host", "127.0.0.1", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/", timeout=2)  # any status: until first install, all are 307
                break
            except httpx.HTTPError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "LNbits did not start: " + (workdir / "lnbits.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.3)
        password = secrets.token_urlsafe(12)
        r = httpx.put(
            f"{url}/api/v1/auth/first_install",
            json={"username": "admin", "password": password, "password_repeat": password},
            timeout=30,
        )
        r.raise_for_status()
        yield LNbits(url, r.json()["access_token"], process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
