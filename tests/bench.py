"""``nox -s bench``: the gateway's own cost, measured side by side with the direct path.

Three processes, so that the figures hold on a 2-core machine: the gateway
(``routecat serve``), the provider (fake engine + owlrun, ``tests.bench_node``) and
this load generator. Gateway CPU comes from /proc accounting of its process alone.
Results are printed as a Markdown table; ``docs/performance.md`` records a run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


async def read_line_with(proc: trio.Process, marker: bytes, buf: bytearray) -> str:
    stream = proc.stdout
    assert stream is not None
    while marker not in buf or b"\n" not in buf[buf.index(marker) :]:  # the whole line
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError(f"process ended before {marker!r}: {buf.decode(errors='replace')}")
        buf += chunk
    line = buf[buf.index(marker) :].split(b"\n", 1)[0]
    return line.decode()


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 100,
    }
    if stream:
        body["stream"] = True
    return body


async def timed_requests(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    n: int,
    concurrency: int,
    failures: list[str] | None = None,
) -> tuple[list[float], float]:
    """Latencies of ``n`` requests from ``concurrency`` workers, and the wall time. A
    failed request is recorded in ``failures`` when given (else it stops the run)."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for _ in counter:
            t = time.perf_counter()
            try:
                r = await client.post(url, json=body)
            except httpx.HTTPError as exc:
                if failures is None:
                    raise
                failures.append(repr(exc)[:200])
                continue
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                if failures is None:
                    raise AssertionError(r.text)
                failures.append(f"{r.status_code} {r.text[:200]}")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return latencies, time.perf_counter() - start


async def timed_streams(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    n: int,
    failures: list[str] | None = None,
    concurrency: int = 1,
) -> tuple[list[float], list[float]]:
    """Time to first chunk and whole-stream time of ``n`` streams read to their end."""
    ttfts, totals = [], []
    counter = iter(range(n))

    async def worker() -> None:
        for _ in counter:
            t = time.perf_counter()
            first = None
            chunks = 0
            async with client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunks += 1
                        if first is None:
                            first = time.perf_counter() - t
            totals.append(time.perf_counter() - t)
            ttfts.append(first or 0.0)
            if r.status_code != 200 or chunks < 2:
                if failures is None:
                    raise AssertionError(f"stream failed: {r.status_code}, {chunks} chunks")
                failures.append(f"stream {r.status_code}, {chunks} chunks")

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return ttfts, totals


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_cpu(pid: int, action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    before = cpu_seconds(pid)
    result = await action()
    return cpu_seconds(pid) - before, result


async def bench_settlements(tmp: str, n: int, concurrency: int = 64) -> tuple[float, int]:
    """Settlements per second through the real write path: admission reservations,
    then ``Settlement.settle`` from many concurrent jobs (group commit, synchronous=FULL)."""
    from ledger import book
    from owlrun.protocol import Usage
    from routecat.config import load_config
    from routecat.gateway import open_gateway
    from routecat.network.jobs import JobResult, JobSpec
    from routecat.server import open_store

    config = load_config(
        flags={"database": f"{tmp}/settle{concurrency}.db", "btc_usd": "100000"}, environ={}
    )
    store = open_store(config)
    async with open_gateway(config, store=store) as gw:
        await store.write(
            lambda db: book.post(
                db,
                "fund",
                "credit",
                [book.Posting("user:1", 10**15), book.Posting(book.OPERATOR_EQUITY, -(10**15))],
            )
        )
        specs = []
        for i in range(n):
            spec = JobSpec(
                f"job{i}",
                "chat",
                "llama3.1:8b",
                {"max_tokens": 2000},
                False,
                1,
                2000,
                100,
                requested_max_tokens=2000,
            )
            specs.append(await gw.admissions.admit(spec))
        results = [
            JobResult(
                s,
                "done",
                "node_bench",
                "stop",
                Usage(50, 200),
                200,
                800,
                1,
                (),
                time.time(),
                0.5,
                0.05,
            )
            for s in specs
        ]
        batches = store.batches
        queue = iter(results)

        async def settler() -> None:
            for r in queue:
                await gw.settlement.settle(r)

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(settler)
        elapsed = time.perf_counter() - start
        check = store.read_sync(book.check)
        assert check.ok and check.transactions == n + 1, check
        used = store.batches - batches
        store.close()
    return n / elapsed, used


async def stream_tokens_per_second(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], runs: int
) -> float:
    """Median tokens per second of whole streams (chunks / wall time)."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        chunks = 0
        async with client.stream("POST", url, json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    chunks += 1
        rates.append(chunks / (time.perf_counter() - start))
    return statistics.median(rates)


async def bench_real_engine(
    gateway_url: str, key: str, tmp: str, rows: list[tuple[str, str]]
) -> None:
    """Tokens per second of a real llama.cpp engine (the generated tiny model), direct vs
    through gateway + owlrun, streamed."""
    from routecat.demo import llama_server_command

    python = os.environ.get("ROUTECAT_TEST_ENGINE_PYTHON")
    if not python:
        rows.append(
            ("real engine", "skipped: ROUTECAT_TEST_ENGINE_PYTHON not set (run nox -s bench)")
        )
        return
    model = f"{tmp}/tiny.gguf"
    await trio.run_process([python, "tests/engine/tiny_model.py", model])
    port = 18000 + os.getpid() % 1000
    engine_url = f"http://127.0.0.1:{port}"
    with open(f"{tmp}/engine.log", "wb") as log:
        engine = await trio.lowlevel.open_process(
            llama_server_command(python, model, "tiny:test", port),
            stdout=log,
            stderr=log,
        )
        agent = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "owlrun",
                "--gateway",
                gateway_url,
                "--backend",
                "openai",
                "--backend-url",
                engine_url,
                "--config",
                f"{tmp}/node.json",
                "--log-level",
                "WARNING",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        async with httpx.AsyncClient(timeout=120) as c:
            with trio.fail_after(120):
                while True:
                    try:
                        models = (await c.get(f"{gateway_url}/v1/models")).json()["data"]
                        if any(m["id"] == "tiny:test" for m in models):
                            break
                    except httpx.HTTPError:
                        pass
                    await trio.sleep(0.3)
            body = {
                "model": "tiny:test",
                "messages": [{"role": "user", "content": "tell a story"}],
                "temperature": 0,
                "max_tokens": 512,
                "stream": True,
            }
            direct = await stream_tokens_per_second(c, f"{engine_url}/v1/chat/completions", body, 5)
            c.headers["Authorization"] = f"Bearer {key}"
            gateway = await stream_tokens_per_second(
                c, f"{gateway_url}/v1/chat/completions", body, 5
            )
        rows.append(
            (
                "real engine (llama.cpp, tiny model) streamed tokens/s direct / gateway",
                f"{direct:.0f} / {gateway:.0f} tok/s (x{gateway / direct:.2f})",
            )
        )
    finally:
        for proc in (agent, engine):
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


def option(name: str, default: str = "") -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv[:-1] else default


async def main() -> None:
    from tests.bench_peer import (
        cores,
        figures,
        floor_figures,
        pin,
        ratio_rows,
        start_litellm,
        tree_cpu,
        tree_rss,
    )
    from tests.procs import terminate

    quick = "--quick" in sys.argv
    peer = option("--peer")
    if peer not in ("", "litellm"):
        raise SystemExit(f"--peer: only litellm is known, not {peer!r}")
    n = 300 if quick else 2000
    seconds = 3 if quick else 10  # each non-stream phase of --peer (wrk)
    rows: list[tuple[str, str]] = []
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count()}
    gateway_cores, other_cores = cores()
    os.sched_setaffinity(0, other_cores)  # this client, and the node started below
    tmp = tempfile.mkdtemp(prefix="routecat-bench-")
    env = {
        **os.environ,
        "ROUTECAT_DATABASE": f"{tmp}/bench.db",
        "ROUTECAT_PORT": "0",
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000000",
        "ROUTECAT_QUEUE_MAX": "100000",
        "ROUTECAT_BTC_USD": "100000",
    }
    # --gateway-src DIR: the gateway, its node and its CLI from another checkout (an
    # older commit measured beside this one, in the same hour).
    src = option("--gateway-src", os.getcwd())
    env["PYTHONPATH"] = src
    log_path = f"{tmp}/gateway.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 - a file, not a pipe: nobody must drain it
    gateway = await trio.lowlevel.open_process(
        [sys.executable, "-m", "routecat", "serve"], env=env, stderr=log_file, cwd=src
    )
    pin(gateway.pid, gateway_cores)  # a one-core figure
    node = None
    try:
        with trio.fail_after(30):
            while "listening on" not in Path(log_path).read_text():
                await trio.sleep(0.05)
        text = Path(log_path).read_text()
        url = text.split("listening on ")[1].split()[0]
        node = await trio.lowlevel.open_process(
            [sys.executable, "-m", "tests.bench_node", url],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": src},
            cwd=src,
        )
        nbuf = bytearray()
        with trio.fail_after(30):
            engine_url = (await read_line_with(node, b"ENGINE", nbuf)).split()[1]
            await read_line_with(node, b"READY", nbuf)
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            key = (await c.post("/v1/auth/register", json={"name": "bench"})).json()["api_key"]
            c.headers["Authorization"] = f"Bearer {key}"
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
                env=env,
                capture_stdout=True,
                cwd=src,
            )
            direct = httpx.AsyncClient(base_url=engine_url, timeout=120, limits=limits)
            if peer:
                ours = await figures(c, lambda: tree_cpu(gateway.pid), n, seconds)
                ours["rss_mib"] = tree_rss(gateway.pid)
                engine_only = await figures(direct, None, n, seconds)
                floor = await floor_figures(
                    tmp, int(ours["stream_writes"]), gateway_cores, n, seconds
                )
                litellm = os.environ.get("ROUTECAT_BENCH_LITELLM", "")
                if not litellm:
                    raise SystemExit(
                        "ROUTECAT_BENCH_LITELLM is unset: run nox -s bench -- --peer litellm"
                    )
                lite, lite_url = await start_litellm(litellm, engine_url, tmp, gateway_cores)
                try:
                    async with httpx.AsyncClient(
                        base_url=lite_url,
                        timeout=120,
                        limits=limits,
                        headers={"Authorization": "Bearer sk-bench-master-key"},
                    ) as lc:
                        theirs = await figures(lc, lambda: tree_cpu(lite.pid), n, seconds)
                        theirs["rss_mib"] = tree_rss(lite.pid)
                finally:
                    await terminate(lite)
                await direct.aclose()
                pinned = (
                    "gateway pinned to one core" if gateway_cores != other_cores else "one core"
                )
                print(
                    f"\nRouteCat vs LiteLLM ({'quick' if quick else 'full'}, {os.cpu_count()} cores,"
                    f" {pinned}, {time.strftime('%Y-%m-%d %H:%M')})\n"
                )
                print(ratio_rows(ours, theirs, engine_only, floor))
                results.update(
                    routecat=ours, litellm=theirs, direct=engine_only, hypercorn_alone=floor
                )
                write_json(results, "litellm")
                return
            # Warm up both paths.
            await timed_requests(c, "/v1/chat/completions", chat("fast:1b"), 50, 4)
            await timed_requests(direct, "/v1/chat/completions", chat("fast:1b"), 50, 4)

            # Latency at concurrency 1, side by side.
            d_lat, _ = await timed_requests(
                direct, "/v1/chat/completions", chat("fast:1b"), n // 4, 1
            )
            cpu, (g_lat, _) = await measure_cpu(
                gateway.pid,
                lambda: timed_requests(c, "/v1/chat/completions", chat("fast:1b"), n // 4, 1),
            )
            rows.append(
                (
                    "non-stream p50 direct / through gateway",
                    f"{pct(d_lat, 0.5) * 1000:.2f} ms / {pct(g_lat, 0.5) * 1000:.2f} ms (x{pct(g_lat, 0.5) / pct(d_lat, 0.5):.2f})",
                )
            )
            rows.append(
                (
                    "added latency p50 / p99 at concurrency 1",
                    f"{(pct(g_lat, 0.5) - pct(d_lat, 0.5)) * 1000:.2f} ms / {(pct(g_lat, 0.99) - pct(d_lat, 0.99)) * 1000:.2f} ms",
                )
            )
            rows.append(
                ("gateway p99 / p50 at concurrency 1", f"{pct(g_lat, 0.99) / pct(g_lat, 0.5):.2f}")
            )
            rows.append(
                ("gateway CPU per non-stream request (c=1)", f"{cpu / len(g_lat) * 1000:.2f} ms")
            )

            for conc in (16, 64):
                d_lat, d_wall = await timed_requests(
                    direct, "/v1/chat/completions", chat("fast:1b"), n, conc
                )
                cpu, (g_lat, g_wall) = await measure_cpu(
                    gateway.pid,
                    lambda conc=conc: timed_requests(
                        c, "/v1/chat/completions", chat("fast:1b"), n, conc
                    ),
                )
                rows.append(
                    (
                        f"throughput c={conc} direct / gateway",
                        f"{n / d_wall:.0f} / {n / g_wall:.0f} req/s (x{(n / g_wall) / (n / d_wall):.2f})",
                    )
                )
                rows.append(
                    (f"gateway CPU per non-stream request (c={conc})", f"{cpu / n * 1000:.2f} ms")
                )

            # Streams of 64 chunks.
            s = n // 10
            d_ttft, d_total = await timed_streams(
                direct, "/v1/chat/completions", chat("long64:1b", True), s
            )
            cpu, (g_ttft, g_total) = await measure_cpu(
                gateway.pid,
                lambda: timed_streams(c, "/v1/chat/completions", chat("long64:1b", True), s),
            )
            rows.append(
                (
                    "stream TTFT p50 direct / gateway",
                    f"{pct(d_ttft, 0.5) * 1000:.2f} / {pct(g_ttft, 0.5) * 1000:.2f} ms",
                )
            )
            rows.append(
                (
                    "64-chunk stream total p50 direct / gateway",
                    f"{pct(d_total, 0.5) * 1000:.2f} / {pct(g_total, 0.5) * 1000:.2f} ms (x{pct(g_total, 0.5) / pct(d_total, 0.5):.2f})",
                )
            )
            rows.append(
                (
                    "gateway CPU per 64-chunk stream / per chunk",
                    f"{cpu / s * 1000:.2f} ms / {cpu / s / 64 * 1e6:.0f} us",
                )
            )
            await direct.aclose()

            await bench_real_engine(url, key, tmp, rows)

            # Memory per open stream.
            streams = 200 if quick else 1000
            base_rss = rss_mib(gateway.pid)
            opened = trio.Semaphore(0)
            release = trio.Event()

            async def hold() -> None:
                async with c.stream(
                    "POST", "/v1/chat/completions", json=chat("stall:1b", True)
                ) as r:
                    if r.status_code != 200:
                        raise RuntimeError(
                            f"stream refused: {r.status_code} {(await r.aread())[:300]!r}"
                        )
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            opened.release()
                            break
                    await release.wait()

            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(hold)
                got = 0
                with trio.move_on_after(60):
                    while got < streams:
                        await opened.acquire()
                        got += 1
                if got != streams:
                    raise RuntimeError(f"only {got} of {streams} streams opened")
                held_rss = rss_mib(gateway.pid)
                release.set()
                nursery.cancel_scope.cancel()
            per = (held_rss - base_rss) / streams
            rows.append(
                (
                    f"gateway RSS with {streams} open streams",
                    f"{held_rss:.0f} MiB ({base_rss:.0f} idle; {per * 1024:.0f} KiB per stream; 10,000 streams ~ {base_rss + per * 10000:.0f} MiB)",
                )
            )
    finally:
        log_file.close()
        for proc in (node, gateway):
            if proc is not None and proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
    for concurrency in (1, 64):
        per_s, batches = await bench_settlements(tmp, 2000 if quick else 10000, concurrency)
        rows.append(
            (
                f"settlements per second, {concurrency} concurrent (SQLite WAL, synchronous=FULL)",
                f"{per_s:.0f}/s ({batches} commits)",
            )
        )
    print(
        f"\nRouteCat bench ({'quick' if quick else 'full'}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})\n"
    )
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    results["rows"] = dict(rows)
    write_json(results, "quick" if quick else "full")


def write_json(results: dict[str, Any], kind: str) -> None:
    """The run's figures as JSON: ``--json PATH``, else ``bench-KIND.json`` here."""
    path = Path(option("--json", f"bench-{kind}.json"))
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON: {path.resolve()}")


if __name__ == "__main__":
    trio.run(main)
