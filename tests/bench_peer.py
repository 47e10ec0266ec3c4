"""``nox -s bench -- --peer litellm``: RouteCat beside LiteLLM in one run.

The same fake engine (``tests.bench_node``: 64 chunks per stream, one token per chunk,
no pacing), the same load generator and the same pinning: each gateway on the first
core, everything else on the others, one after the other. LiteLLM runs with one
worker, a master key and a model list pointing at the fake engine, from its own
virtualenv (``ROUTECAT_BENCH_LITELLM`` names its ``litellm`` executable). Gateway CPU is
the user + system time of the gateway's process tree, from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.bench import chat, cpu_seconds, pct, rss_mib, timed_requests
from tests.procs import terminate, tree

LITELLM_KEY = "sk-bench-master-key"


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):  # it ended meanwhile
            total += cpu_seconds(p)
    return total


def tree_rss(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += rss_mib(p)
    return total


def cores() -> tuple[set[int], set[int]]:
    """(the gateway's core, everyone else's): split where the machine has two or more."""
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return set(mine), set(mine)
    return {mine[0]}, set(mine[1:])


def pin(pid: int, cpus: set[int]) -> None:
    for p in tree(pid):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(p, cpus)


async def stream_events(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], n: int, concurrency: int
) -> tuple[list[float], list[int], float, list[str]]:
    """Whole-stream times, SSE events per stream, the wall time and failures."""
    totals: list[float] = []
    events: list[int] = []
    failures: list[str] = []
    counter = iter(range(n))

    async def worker() -> None:
        for _ in counter:
            t = time.perf_counter()
            count = 0
            try:
                async with client.stream("POST", url, json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            count += 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc)[:200])
                continue
            totals.append(time.perf_counter() - t)
            events.append(count)
            if r.status_code != 200 or count < 2:
                failures.append(f"stream {r.status_code}, {count} events")

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return totals, events, time.perf_counter() - start, failures


async def body_writes(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> int:
    """How many writes the server made for one streamed body: each write of a chunked
    HTTP/1.1 body is one chunk on the wire, counted here over a raw socket."""
    base = client.base_url
    payload = json.dumps(body).encode()
    auth = client.headers.get("Authorization")
    head = (
        f"POST {url} HTTP/1.1\r\nHost: {base.host}:{base.port}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        + (f"Authorization: {auth}\r\n" if auth else "")
        + "\r\n"
    ).encode()
    data = b""
    writes = 0
    async with await trio.open_tcp_stream(base.host, base.port or 80) as stream:
        await stream.send_all(head + payload)
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        rest = data.split(b"\r\n\r\n", 1)[1]
        while True:  # one chunk: "size\r\n" + size bytes + "\r\n"; the last has size 0
            while b"\r\n" not in rest:
                rest += await stream.receive_some(65536)
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return writes
            while len(rest) < size + 2:
                more = await stream.receive_some(65536)
                if not more:
                    raise RuntimeError("the body ended inside a chunk")
                rest += more
            writes += 1
            rest = rest[size + 2 :]


# wrk's script: the request, and one line of figures at the end (latencies in us).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= "" then wrk.headers["Authorization"] = auth end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d\\n", summary.requests,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50),
    latency:percentile(99), summary.duration))
end
"""


async def wrk_requests(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], concurrency: int, seconds: int
) -> dict[str, float]:
    """``wrk`` (one thread, ``concurrency`` keep-alive connections, ``seconds`` long)
    sending the same request over and over: requests done, failed (socket errors and
    statuses other than 2xx/3xx), p50 and p99 in ms, and the wall time. A client in C
    costs little of the core it shares with the engine and the node, so the latencies
    are the servers' rather than the client's."""
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-wrk-{os.getpid()}.lua"
    script.write_text(WRK_SCRIPT)
    env = {
        **os.environ,
        "BENCH_BODY": json.dumps(body),
        "BENCH_AUTH": client.headers.get("Authorization", ""),
    }
    result = await trio.run_process(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s",
         str(script), str(client.base_url).rstrip("/") + url],
        env=env, capture_stdout=True, capture_stderr=True,
    )  # fmt: skip
    line = next(x for x in result.stdout.decode().splitlines() if x.startswith("WRK "))
    done, errors, statuses, p50, p99, duration = (int(x) for x in line.split()[1:])
    return {
        "requests": done,
        "failures": errors + statuses,
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "wall_s": duration / 1e6,
    }


async def figures(
    client: httpx.AsyncClient, cpu: Callable[[], float] | None, n: int, seconds: int = 10
) -> dict[str, float]:
    """One gateway's (or the direct engine's) figures, the same phases for each:
    non-stream requests from wrk for ``seconds`` at each concurrency, then streams."""
    out: dict[str, float] = {}
    failures: list[str] = []
    url = "/v1/chat/completions"
    await timed_requests(client, url, chat("fast:1b"), 50, 4, failures)  # warm up
    await stream_events(client, url, chat("long64:1b", True), 10, 1)
    failures.clear()

    def now() -> float:
        return cpu() if cpu is not None else 0.0

    refused = 0  # failed requests of the wrk phases
    for conc in (1, 16, 64):
        before = now()
        run = await wrk_requests(client, url, chat("fast:1b"), conc, seconds)
        used = now() - before
        refused += int(run["failures"])
        out[f"cpu_ms_c{conc}"] = used / max(1, run["requests"]) * 1000
        out[f"rps_c{conc}"] = run["requests"] / run["wall_s"]
        out[f"p50_ms_c{conc}"] = run["p50_ms"]
        out[f"p99_ms_c{conc}"] = run["p99_ms"]
    for conc, count in ((1, n // 10), (16, n // 5)):
        before = now()
        totals, events, wall, failed = await stream_events(
            client, url, chat("long64:1b", True), count, conc
        )
        used = now() - before
        failures += failed
        out[f"stream_cpu_ms_c{conc}"] = used / max(1, len(totals)) * 1000
        out[f"streams_per_s_c{conc}"] = len(totals) / wall
        out[f"stream_p50_ms_c{conc}"] = pct(totals, 0.5) * 1000
        out[f"stream_events_c{conc}"] = statistics.median(events) if events else 0
    out["stream_writes"] = await body_writes(client, url, chat("long64:1b", True))
    out["failures"] = len(failures) + refused
    if failures:
        print("failures (first 5):", failures[:5])
    return out


def free_port() -> int:
    """A TCP port free on the loopback now, for a server that takes its port as an argument."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_litellm(
    litellm: str, engine_url: str, tmp: str, cpus: set[int]
) -> tuple[trio.Process, str]:
    """LiteLLM's proxy, one worker, in front of the fake engine; its URL once it answers."""
    config = Path(tmp) / "litellm.yaml"
    models = "".join(
        f"  - model_name: {name}\n"
        f"    litellm_params:\n"
        f"      model: openai/{name}\n"
        f"      api_base: {engine_url}/v1\n"
        f"      api_key: none\n"
        for name in ("fast:1b", "long64:1b")
    )
    config.write_text(
        f"model_list:\n{models}general_settings:\n  master_key: {LITELLM_KEY}\n"
        "litellm_settings:\n  drop_params: true\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
    }
    log = open(Path(tmp) / "litellm.log", "wb")  # noqa: SIM115 - a file nobody must drain
    process = await trio.lowlevel.open_process(
        [litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", "1"],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as c:
        with trio.fail_after(180):
            while True:
                if process.returncode is not None:
                    raise RuntimeError((Path(tmp) / "litellm.log").read_text()[-3000:])
                try:
                    if (await c.get(url + "/health/liveliness")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)
    print(f"LiteLLM up in {time.perf_counter() - started:.1f} s", flush=True)
    pin(process.pid, cpus)
    return process, url


async def start_floor(tmp: str, writes: int, cpus: set[int]) -> tuple[trio.Process, str]:
    """The server stack alone (``tests.bench_floor``), pinned like a gateway; its URL."""
    port = free_port()
    log = open(Path(tmp) / "floor.log", "wb")  # noqa: SIM115 - a file nobody must drain
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.bench_floor", str(port), str(writes)],
        stdout=log,
        stderr=log,
    )
    pin(process.pid, cpus)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=5) as c:
        with trio.fail_after(30):
            while True:
                if process.returncode is not None:
                    raise RuntimeError((Path(tmp) / "floor.log").read_text()[-3000:])
                try:
                    await c.post(url + "/v1/chat/completions", json={})
                    break
                except httpx.HTTPError:
                    await trio.sleep(0.1)
    return process, url


async def floor_figures(
    tmp: str, writes: int, cpus: set[int], n: int, seconds: int
) -> dict[str, float]:
    """``figures`` of the server stack alone, with the stream cut in ``writes`` writes."""
    process, url = await start_floor(tmp, writes, cpus)
    try:
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            out = await figures(client, lambda: tree_cpu(process.pid), n, seconds)
        out["rss_mib"] = tree_rss(process.pid)
    finally:
        await terminate(process)
    return out


def ratio_rows(
    ours: dict[str, float],
    peer: dict[str, float],
    direct: dict[str, float],
    floor: dict[str, float],
) -> str:
    """The side-by-side table: RouteCat, LiteLLM, the direct engine, the server stack
    alone (hypercorn with a bare app), and the ratios."""
    rows = ["| measure | RouteCat | LiteLLM | direct engine | hypercorn alone"
            " | RouteCat vs LiteLLM |",
            "|---|---|---|---|---|---|"]  # fmt: skip

    def less(key: str) -> str:
        return f"x{peer[key] / ours[key]:.1f} less" if ours[key] else "-"

    def more(key: str) -> str:
        return f"x{ours[key] / peer[key]:.1f}" if peer[key] else "-"

    for conc in (1, 16, 64):
        key = f"cpu_ms_c{conc}"
        rows.append(
            f"| gateway CPU per non-stream request, c={conc} | {ours[key]:.2f} ms"
            f" | {peer[key]:.2f} ms | - | {floor[key]:.2f} ms | {less(key)} |"
        )
    for conc in (1, 16, 64):
        key = f"rps_c{conc}"
        rows.append(
            f"| throughput, c={conc} | {ours[key]:.0f} req/s | {peer[key]:.0f} req/s"
            f" | {direct[key]:.0f} req/s | {floor[key]:.0f} req/s | {more(key)} |"
        )
    for conc in (1, 16, 64):
        key = f"p50_ms_c{conc}"
        p99 = f"p99_ms_c{conc}"
        rows.append(
            f"| p50 / p99, c={conc} | {ours[key]:.2f} / {ours[p99]:.2f} ms"
            f" | {peer[key]:.2f} / {peer[p99]:.2f} ms"
            f" | {direct[key]:.2f} / {direct[p99]:.2f} ms"
            f" | {floor[key]:.2f} / {floor[p99]:.2f} ms | |"
        )
    rows.append(
        f"| added p50, non-stream c=1 | {ours['p50_ms_c1'] - direct['p50_ms_c1']:.2f} ms"
        f" | {peer['p50_ms_c1'] - direct['p50_ms_c1']:.2f} ms | - | - | |"
    )
    for conc in (1, 16):
        key = f"stream_cpu_ms_c{conc}"
        rows.append(
            f"| gateway CPU per 64-chunk stream, c={conc} | {ours[key]:.2f} ms"
            f" | {peer[key]:.2f} ms | - | {floor[key]:.2f} ms | {less(key)} |"
        )
        key = f"streams_per_s_c{conc}"
        rows.append(
            f"| streams per second, c={conc} | {ours[key]:.0f} | {peer[key]:.0f}"
            f" | {direct[key]:.0f} | {floor[key]:.0f} | {more(key)} |"
        )
    rows.append(
        f"| 64-chunk stream total p50, c=1 | {ours['stream_p50_ms_c1']:.2f} ms"
        f" | {peer['stream_p50_ms_c1']:.2f} ms | {direct['stream_p50_ms_c1']:.2f} ms"
        f" | {floor['stream_p50_ms_c1']:.2f} ms | |"
    )
    rows.append(
        f"| SSE events per 64-token stream (c=1 / c=16) | {ours['stream_events_c1']:.0f}"
        f" / {ours['stream_events_c16']:.0f} | {peer['stream_events_c1']:.0f}"
        f" / {peer['stream_events_c16']:.0f} | {direct['stream_events_c1']:.0f}"
        f" / {direct['stream_events_c16']:.0f} | {floor['stream_events_c1']:.0f}"
        f" / {floor['stream_events_c16']:.0f} | |"
    )
    rows.append(
        f"| body writes (HTTP chunks) per 64-token stream, c=1 | {ours['stream_writes']:.0f}"
        f" | {peer['stream_writes']:.0f} | {direct['stream_writes']:.0f}"
        f" | {floor['stream_writes']:.0f} | |"
    )
    rows.append(
        f"| failed requests | {ours['failures']:.0f} | {peer['failures']:.0f}"
        f" | {direct['failures']:.0f} | {floor['failures']:.0f} | |"
    )
    rows.append(
        f"| gateway RSS after the run | {ours['rss_mib']:.0f} MiB | {peer['rss_mib']:.0f} MiB"
        f" | - | {floor['rss_mib']:.0f} MiB | x{peer['rss_mib'] / ours['rss_mib']:.1f} less |"
    )
    return "\n".join(rows)
