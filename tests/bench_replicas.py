"""Replicas on PostgreSQL beside one process on SQLite: throughput and gateway CPU per
billed request (``nox -s bench -- --replicas 2``; ``docs/performance.md`` has figures).

Each setup runs real ``routecat serve`` processes, one bench node (``tests.bench_node``)
per replica, and a load generator that spreads paid non-stream requests over the
replicas. The gateway CPU per request is the CPU of every replica process (from
``/proc``) divided by the requests. PostgreSQL runs in a throwaway cluster
(``tests.pgcluster``); its own CPU is reported separately.

    python -m tests.bench_replicas 2 [--quick]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from tests import pgcluster
from tests.bench import chat, cpu_seconds, pct, read_line_with, timed_requests
from tests.procs import terminate


def postgres_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


async def start_replica(env: dict[str, str], log: Path) -> tuple[trio.Process, str]:
    with open(log, "ab") as out:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "routecat", "serve"], env=env, stderr=out
        )
    with trio.fail_after(60):
        while "listening on " not in log.read_text():
            await trio.sleep(0.05)
    return proc, log.read_text().rsplit("listening on ", 1)[1].split()[0]


async def setup(database: str, replicas: int, tmp: Path, n: int) -> list[tuple[str, str]]:
    name = f"{replicas} replica{'s' if replicas > 1 else ''} on " + (
        "PostgreSQL" if database.startswith("postgresql") else "SQLite"
    )
    tag = f"{abs(hash(database)) % 10**8}"
    base = {
        **os.environ,
        "ROUTECAT_DATABASE": database,
        "ROUTECAT_PORT": "0",
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000000",
        "ROUTECAT_QUEUE_MAX": "100000",
        "ROUTECAT_BTC_USD": "100000",
        "ROUTECAT_CLUSTER_SECRET": "bench-cluster-secret-0123456789",
        "ROUTECAT_FREE_DAILY_REQUESTS": "0",
    }
    procs: list[trio.Process] = []
    urls: list[str] = []
    rows: list[tuple[str, str]] = []
    try:
        for i in range(replicas):
            env = {**base, "ROUTECAT_ADMIN_SOCKET": str(tmp / f"{tag}-{i}.sock")}
            proc, url = await start_replica(env, tmp / f"{tag}-{i}.log")
            procs.append(proc)
            urls.append(url)
        for url in urls:
            node = await trio.lowlevel.open_process(
                [sys.executable, "-m", "tests.bench_node", url],
                stdout=subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            procs.append(node)
            buf = bytearray()
            with trio.fail_after(30):
                await read_line_with(node, b"READY", buf)
        gateways = procs[:replicas]
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
        clients = [httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for u in urls]
        try:
            key = (await clients[0].post("/v1/auth/register", json={"name": "b"})).json()["api_key"]
            await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "routecat",
                    "keys",
                    "credit",
                    key[:11],
                    "--sats",
                    "100000000",
                ],
                env={**base, "ROUTECAT_ADMIN_SOCKET": str(tmp / f"{tag}-0.sock")},
                capture_stdout=True,
            )
            for c in clients:
                c.headers["Authorization"] = f"Bearer {key}"
            # Let the replicas see each other's nodes, then warm up every path.
            await trio.sleep(3)
            for c in clients:
                await timed_requests(c, "/v1/chat/completions", chat("fast:1b"), 50, 4)
            for conc in (16, 64):
                latencies: list[float] = []
                pg_before = sum(cpu_seconds(p) for p in postgres_pids())
                before = [cpu_seconds(g.pid) for g in gateways]
                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for c in clients:

                        async def run(c: httpx.AsyncClient = c) -> None:
                            lat, _ = await timed_requests(
                                c,
                                "/v1/chat/completions",
                                chat("fast:1b"),
                                n // len(clients),
                                max(1, conc // len(clients)),
                            )
                            latencies.extend(lat)

                        nursery.start_soon(run)
                wall = time.perf_counter() - start
                cpu = sum(cpu_seconds(g.pid) for g in gateways) - sum(before)
                pg_cpu = sum(cpu_seconds(p) for p in postgres_pids()) - pg_before
                done = len(latencies)
                rows.append(
                    (
                        f"{name}, c={conc}",
                        f"{done / wall:.0f} req/s, gateway CPU {cpu / done * 1000:.2f} ms/req"
                        + (
                            f" + PostgreSQL {pg_cpu / done * 1000:.2f} ms/req"
                            if database.startswith("postgresql")
                            else ""
                        )
                        + f", p50 {pct(latencies, 0.5) * 1000:.1f} ms,"
                        f" p99 {pct(latencies, 0.99) * 1000:.1f} ms",
                    )
                )
        finally:
            for c in clients:
                await c.aclose()
    finally:
        for proc in reversed(procs):
            await terminate(proc)
    return rows


async def main() -> None:
    replicas = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2
    n = 400 if "--quick" in sys.argv else 2000
    tmp = Path(tempfile.mkdtemp(prefix="routecat-bench-replicas-"))
    pg = Path(tempfile.mkdtemp(prefix="routecat-bench-pg-"))  # its own: postgres must enter it
    admin = pgcluster.start(pg)
    rows: list[tuple[str, str]] = []
    try:
        rows += await setup(str(tmp / "bench.db"), 1, tmp, n)
        rows += await setup(pgcluster.fresh_database(admin), 1, tmp, n)
        rows += await setup(pgcluster.fresh_database(admin), replicas, tmp, n)
    finally:
        pgcluster.stop(pg)
    print(f"\nRouteCat replicas bench ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n")
    print("| setup | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    trio.run(main)
