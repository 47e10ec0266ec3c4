"""A throwaway PostgreSQL cluster for the PostgreSQL test session (Debian's package,
started as the ``postgres`` user with ``runuser`` when we are root), and one fresh
database per test.

``python -m tests.pgcluster start DIR`` prints the admin URL and leaves the server
running; ``python -m tests.pgcluster stop DIR`` stops it. ``nox -s postgres`` does both
around the suite and passes the URL in ``ROUTECAT_TEST_POSTGRES``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

ENV = "ROUTECAT_TEST_POSTGRES"


def bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists():
            return candidate
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not dirs:
        raise RuntimeError("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    return Path(dirs[-1])


def _as_postgres(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(workdir: Path) -> str:
    """Initialise and start a cluster under ``workdir`` (made enterable by the postgres
    user; its parents must be too, as /tmp is); returns the admin URL."""
    bin_ = bindir()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o711)
    data = workdir / "pg"
    data.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    os.chmod(data, 0o700)
    port = _free_port()
    subprocess.run(
        _as_postgres(
            [
                str(bin_ / "initdb"),
                "-D",
                str(data / "data"),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=400"
        " -c fsync=off -c synchronous_commit=on -c full_page_writes=off"
    )
    subprocess.run(
        _as_postgres(
            [
                str(bin_ / "pg_ctl"),
                "-D",
                str(data / "data"),
                "-o",
                options,
                "-l",
                str(data / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    (workdir / "port").write_text(str(port))
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def stop(workdir: Path) -> None:
    workdir = workdir.resolve()
    subprocess.run(
        _as_postgres(
            [str(bindir() / "pg_ctl"), "-D", str(workdir / "pg" / "data"), "-m", "fast", "stop"]
        ),
        check=False,
        capture_output=True,
    )


def fresh_database(admin_url: str) -> str:
    """A new empty database on the cluster of ``admin_url``; returns its URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # a generated name: no injection
    return admin_url.rsplit("/", 1)[0] + "/" + name


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(start(where))
    else:
        stop(where)
