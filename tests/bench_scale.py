"""``nox -s bench -- --scale``: how the gateway holds up as the work grows.

- ``streams``: 10,000 concurrent open streams actually held, each receiving one chunk
  every 10 s (1,000 chunks/s in all): the gateway's RSS and CPU, and the delay from the
  engine's chunk to the client (each chunk carries the time it was sent).
- ``nodes``: 100, 1,000 and 10,000 connected nodes (lightweight fake nodes speaking the
  protocol, all in this process): the gateway's idle CPU with heartbeats, and its CPU
  per job as the network grows.
- ``growth``: 1, 100 and 10,000 keys in use; a ledger of 10 million postings (the
  settlement's cost, the start-up time, ``routecat ledger check``'s time).

Every figure is the gateway's alone (``/proc`` user + system time of its process,
pinned to the first core; this process, the fake nodes and the clients, on the others).
The file-descriptor limit is raised here to the hard limit (inherited by the gateway).
Run one with ``--scale streams``, ``--scale nodes`` or ``--scale growth``;
``--streams N``, ``--nodes 100,1000``, ``--keys 1,100``, ``--postings N`` change the
sizes, ``--heartbeat S`` the gateway's heartbeat interval for the nodes bench.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from owlrun.agent import ping_after
from owlrun.protocol import (
    NODE_HEADER,
    PROTOCOL_VERSION,
    SECRET_HEADER,
    WS_PATH,
    Cancel,
    Chunk,
    Delta,
    Done,
    Earnings,
    Heartbeat,
    Hello,
    Job,
    ModelInfo,
    Usage,
    Welcome,
    decode,
    encode,
)
from tests.bench import cpu_seconds, option, pct, rss_mib
from tests.bench_peer import cores, pin
from tests.procs import terminate

STAMP = re.compile(rb'"content":"S(\d+\.\d+) "')


class FakeNode:
    """One node connection over wsproto, light enough for 10,000 in one process.

    ``drip``: each job gets a first chunk at once, then one every ``interval`` seconds
    (stamped with the wall time it was sent) until the gateway cancels it. Otherwise a
    job is answered at once: one chunk, then done.
    """

    def __init__(self, host: str, port: int, capacity: int, drip: float | None, model: str) -> None:
        self.host, self.port = host, port
        self.node_id = "bench_" + secrets.token_hex(6)
        self.secret = secrets.token_urlsafe(24)
        self.capacity = capacity
        self.drip = drip
        self.model = model
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.out: list[bytes] = []
        self.wake = trio.Event()
        self.jobs: dict[str, trio.CancelScope] = {}
        self.welcomed = trio.Event()
        self.told = False  # the gateway sent this node its earnings (it does on connect)
        self.served = 0
        self.interval = 10.0
        self.heard = 0.0  # when the gateway last sent anything (trio's clock)

    def send(self, message: Any) -> None:
        self.out.append(self.ws.send(TextMessage(encode(message))))
        self.wake.set()

    async def run(self, nursery: trio.Nursery) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        headers = [
            (NODE_HEADER.encode(), self.node_id.encode()),
            (SECRET_HEADER.encode(), self.secret.encode()),
        ]
        await stream.send_all(
            self.ws.send(
                Request(host=f"{self.host}:{self.port}", target=WS_PATH, extra_headers=headers)
            )
        )
        nursery.start_soon(self._writer, stream)
        text: list[str] = []
        async with trio.open_nursery() as jobs:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                self.ws.receive_data(data)
                self.heard = trio.current_time()
                for event in self.ws.events():
                    if isinstance(event, AcceptConnection):
                        self.send(
                            Hello(
                                node_id=self.node_id,
                                agent_version="bench",
                                protocol_version=PROTOCOL_VERSION,
                                models=[ModelInfo(self.model)],
                                max_concurrency=self.capacity,
                            )
                        )
                    elif isinstance(event, RejectConnection):
                        raise RuntimeError(f"node socket rejected: {event.status_code}")
                    elif isinstance(event, Ping):
                        self.out.append(self.ws.send(event.response()))
                        self.wake.set()
                    elif isinstance(event, CloseConnection):
                        return
                    elif isinstance(event, TextMessage):
                        text.append(event.data)
                        if event.message_finished:
                            self._handle(decode("".join(text)), jobs)
                            text = []

    def _handle(self, message: Any, jobs: trio.Nursery) -> None:
        if isinstance(message, Welcome):
            self.interval = message.heartbeat_interval
            self.welcomed.set()
            jobs.start_soon(self._heartbeats)
        elif isinstance(message, Job):
            self.served += 1
            if self.drip is None:
                self.send(Chunk(message.job_id, Delta("ok")))
                self.send(Done(message.job_id, "stop", Usage(1, 1)))
            else:
                scope = trio.CancelScope()
                self.jobs[message.job_id] = scope
                jobs.start_soon(self._drip, message.job_id, scope)
        elif isinstance(message, Earnings):
            self.told = True
        elif isinstance(message, Cancel):
            scope = self.jobs.pop(message.job_id, None)
            if scope is not None:
                scope.cancel()

    async def _drip(self, job_id: str, scope: trio.CancelScope) -> None:
        assert self.drip is not None
        with scope:
            while True:
                self.send(Chunk(job_id, Delta(f"S{time.time():.6f} ")))
                await trio.sleep(self.drip)

    async def _heartbeats(self) -> None:
        """As owlrun does: a heartbeat every interval, and (protocol 4: the gateway
        answers none) a ping with the heartbeat when the gateway has said nothing for
        ``ping_after`` the interval (45 s at the default 10 s)."""
        while True:
            await trio.sleep(self.interval)
            self.send(Heartbeat(in_flight=len(self.jobs)))
            if trio.current_time() - self.heard >= ping_after(self.interval):
                self.out.append(self.ws.send(Ping()))
                self.heard = trio.current_time()  # the pong will say so again

    async def _writer(self, stream: trio.SocketStream) -> None:
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            data, self.out = b"".join(self.out), []
            await stream.send_all(data)


async def start_gateway(
    tmp: str, extra: dict[str, str]
) -> tuple[trio.Process, str, dict[str, str]]:
    env = {
        **os.environ,
        "ROUTECAT_DATABASE": f"{tmp}/scale.db",
        "ROUTECAT_PORT": "0",
        "ROUTECAT_RATE_LIMIT_PER_MINUTE": "100000000",
        "ROUTECAT_QUEUE_MAX": "100000",
        "ROUTECAT_BTC_USD": "100000",
        **extra,
    }
    log = open(f"{tmp}/gateway.log", "wb")  # noqa: SIM115 - a file nobody must drain
    gateway = await trio.lowlevel.open_process(
        [sys.executable, "-m", "routecat", "serve"], env=env, stderr=log
    )
    with trio.fail_after(60):
        while "listening on" not in Path(f"{tmp}/gateway.log").read_text():
            if gateway.returncode is not None:
                raise RuntimeError(Path(f"{tmp}/gateway.log").read_text()[-2000:])
            await trio.sleep(0.05)
    url = Path(f"{tmp}/gateway.log").read_text().split("listening on ")[1].split()[0]
    return gateway, url, env


async def paying_key(url: str, env: dict[str, str]) -> str:
    async with httpx.AsyncClient(base_url=url) as c:
        key = (await c.post("/v1/auth/register", json={"name": "scale"})).json()["api_key"]
    await trio.run_process(
        [sys.executable, "-m", "routecat", "keys", "credit", key[:11], "--sats", "100000000"],
        env=env,
        capture_stdout=True,
    )
    return str(key)


async def open_stream(
    host: str, port: int, key: str, model: str, delays: list[float], opened: Callable[[], None]
) -> None:
    """One streaming request over a raw socket; every stamped chunk's delay is recorded."""
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": "hold"}],
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(head + body)
        first = True
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the gateway ended a held stream")
            now = time.time()
            if first:
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"stream refused: {data[:300]!r}")
                first = False
                opened()
            for stamp in STAMP.findall(data):
                delays.append(now - float(stamp))


async def bench_streams(count: int, seconds: float) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    gateway_cores, other_cores = cores()
    os.sched_setaffinity(0, other_cores)
    tmp = tempfile.mkdtemp(prefix="routecat-scale-")
    gateway, url, env = await start_gateway(
        tmp, {"ROUTECAT_INTER_TOKEN_TIMEOUT": "60", "ROUTECAT_QUEUE_TIMEOUT": "120"}
    )
    pin(gateway.pid, gateway_cores)
    host, port = url.split("//")[1].split(":")
    try:
        key = await paying_key(url, env)
        delays: list[float] = []
        failures: list[str] = []
        opened = 0

        def one_opened() -> None:
            nonlocal opened
            opened += 1

        async with trio.open_nursery() as nursery:
            per_node = 4000
            nodes = [
                FakeNode(host, int(port), per_node, 10.0, "drip:1b")
                for _ in range(-(-count // per_node) + 1)
            ]
            for node in nodes:
                nursery.start_soon(node.run, nursery)
            for node in nodes:
                await node.welcomed.wait()
            idle_rss = rss_mib(gateway.pid)
            started = time.perf_counter()
            cpu_before = cpu_seconds(gateway.pid)
            gate = trio.Semaphore(200)  # connections being opened at once (the backlog)

            async def one() -> None:
                async with gate:
                    done = trio.Event()

                    def mark() -> None:
                        one_opened()
                        done.set()

                    async def held() -> None:
                        try:
                            await open_stream(host, int(port), key, "drip:1b", delays, mark)
                        except (OSError, RuntimeError, trio.BrokenResourceError) as exc:
                            failures.append(f"{'open' if not done.is_set() else 'held'}: {exc}")
                            done.set()

                    nursery.start_soon(held)
                    await done.wait()

            async with trio.open_nursery() as openers:
                for _ in range(count):
                    openers.start_soon(one)
            open_time = time.perf_counter() - started
            open_cpu = cpu_seconds(gateway.pid) - cpu_before
            print(f"{opened} streams open in {open_time:.1f} s", flush=True)
            await trio.sleep(12)  # every stream past its first timed chunk
            delays.clear()
            cpu_before = cpu_seconds(gateway.pid)
            t0 = time.perf_counter()
            await trio.sleep(seconds)
            held_cpu = cpu_seconds(gateway.pid) - cpu_before
            elapsed = time.perf_counter() - t0
            held_rss = rss_mib(gateway.pid)
            fds = len(os.listdir(f"/proc/{gateway.pid}/fd"))
            got = list(delays)
            nursery.cancel_scope.cancel()
        rows += [
            (
                "open streams held",
                f"{opened - len(failures)} of {count} (gateway file descriptors: {fds})",
            ),
            ("streams failed", f"{len(failures)} {sorted(set(failures))[:3]}"),
            (
                "time to open them",
                f"{open_time:.1f} s ({open_cpu / max(1, opened) * 1000:.2f} ms of gateway CPU each)",
            ),
            (
                "gateway RSS idle / holding them",
                f"{idle_rss:.0f} / {held_rss:.0f} MiB ({(held_rss - idle_rss) * 1024 / max(1, opened):.1f} KiB per stream)",
            ),
            ("chunks delivered per second while held", f"{len(got) / elapsed:.0f}"),
            (
                "gateway CPU while held",
                f"{held_cpu / elapsed * 100:.1f}% of a core ({held_cpu / max(1, len(got)) * 1e6:.0f} us per chunk)",
            ),
            (
                "engine chunk -> client delay p50 / p99 / max",
                f"{pct(got, 0.5) * 1000:.1f} / {pct(got, 0.99) * 1000:.1f} / {max(got) * 1000:.1f} ms",
            ),
        ]
    finally:
        await terminate(gateway, 20)
    return rows


async def bench_nodes(sizes: list[int], jobs: int, heartbeat: str) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    gateway_cores, other_cores = cores()
    os.sched_setaffinity(0, other_cores)
    tmp = tempfile.mkdtemp(prefix="routecat-scale-")
    gateway, url, env = await start_gateway(
        tmp, {"ROUTECAT_HEARTBEAT_INTERVAL": heartbeat} if heartbeat else {}
    )
    pin(gateway.pid, gateway_cores)
    host, port = url.split("//")[1].split(":")
    try:
        key = await paying_key(url, env)
        async with trio.open_nursery() as nursery:
            nodes: list[FakeNode] = []
            for size in sizes:
                started = time.perf_counter()
                gate = trio.Semaphore(200)

                async def connect(node: FakeNode) -> None:
                    async with gate:
                        nursery.start_soon(node.run, nursery)
                        await node.welcomed.wait()

                async with trio.open_nursery() as connecting:
                    while len(nodes) < size:
                        node = FakeNode(host, int(port), 4, None, "fast:1b")
                        nodes.append(node)
                        connecting.start_soon(connect, node)
                took = time.perf_counter() - started
                interval = nodes[0].interval
                # Idle means the connections' own work is over: the gateway tells each
                # new node its earnings (a database read each, 5 s for 10,000 nodes).
                with trio.move_on_after(120):
                    while not all(n.told for n in nodes):
                        await trio.sleep(0.5)
                # A node pings at the first heartbeat after ``ping_after`` of quiet: once
                # per period, from a period after it last heard the gateway (its
                # earnings). The window opens when every node pings in its own phase
                # and spans a period, so that it holds each node's ping once.
                period = math.ceil(ping_after(interval) / interval) * interval
                await trio.sleep(period + 2)
                before = cpu_seconds(gateway.pid)
                t0 = time.perf_counter()
                await trio.sleep(max(20.0, 2 * interval, period))
                idle = (cpu_seconds(gateway.pid) - before) / (time.perf_counter() - t0)
                served = sum(n.served for n in nodes)
                per_job_ms, p50, p99, wall = await load(url, [key], jobs, gateway.pid, warm=False)
                # The jobs' own cost: the heartbeats' CPU over the same time taken out.
                net_ms = per_job_ms - idle * wall / jobs * 1000
                spread = [n.served for n in nodes]
                rows.append(
                    (
                        f"{size} nodes",
                        f"connected in {took:.1f} s; idle CPU with heartbeats (every"
                        f" {interval:g} s, unanswered; a ping after {ping_after(interval):g} s of quiet)"
                        f" {idle * 100:.1f}% of a core;"
                        f" {per_job_ms:.2f} ms of gateway CPU per job (c=16;"
                        f" {net_ms:.2f} ms without the heartbeats' share), p50"
                        f" {p50:.1f} ms, p99 {p99:.1f} ms;"
                        f" {sum(spread) - served} jobs over {sum(1 for n in spread if n)} nodes,"
                        f" at most {max(spread)} on one",
                    )
                )
                print(rows[-1][1], flush=True)
            rss = rss_mib(gateway.pid)
            rows.append((f"gateway RSS with {len(nodes)} nodes", f"{rss:.0f} MiB"))
            nursery.cancel_scope.cancel()
    finally:
        await terminate(gateway, 20)
    return rows


async def load(
    url: str, keys: list[str], jobs: int, pid: int, concurrency: int = 16, warm: bool = True
) -> tuple[float, float, float, float]:
    """(gateway CPU ms per request, p50 ms, p99 ms, wall seconds) of ``jobs`` paid
    requests spread over ``keys`` round robin (after as many unmeasured, with ``warm``:
    each key's first use)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    counter = iter(range(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            for n in counter:
                t = time.perf_counter()
                r = await client.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {keys[n % len(keys)]}"},
                    json={
                        "model": "fast:1b",
                        "max_tokens": 10,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                if r.status_code != 200:
                    raise RuntimeError(f"request failed: {r.status_code} {r.text[:300]}")
                latencies.append(time.perf_counter() - t)

        if warm:
            async with trio.open_nursery() as warming:
                for _ in range(concurrency):
                    warming.start_soon(worker)
            counter = iter(range(jobs))
            latencies.clear()
        before = cpu_seconds(pid)
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        wall = time.perf_counter() - started
    used = cpu_seconds(pid) - before
    return used / jobs * 1000, pct(latencies, 0.5) * 1000, pct(latencies, 0.99) * 1000, wall


def credit_all(database: str, sats: int) -> None:
    """Credit every key at once, from this process, beside the running gateway."""
    from routecat.db.schema import open_store
    from routecat.money.settlement import credit

    store = open_store(database)
    try:

        def write(db: Any) -> None:
            for (key_id,) in db.execute("SELECT id FROM api_keys").fetchall():
                credit(db, int(key_id), sats * 1000, "bench", f"bench-credit:{key_id}")

        store.write_sync(write)
    finally:
        store.close()


def fill_ledger(database: str, postings: int) -> None:
    """``postings`` postings (top-ups of 1,000 accounts, two postings each) written
    straight into the ledger's tables, balances kept exact (``ledger check`` agrees)."""
    import sqlite3

    from routecat.db.schema import open_store

    open_store(database).close()  # migrated
    conn = sqlite3.connect(database)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")  # a bulk load: durability is not the point
    now = "2026-01-01T00:00:00.000Z"
    users = 1000
    with conn:
        conn.executemany(
            "INSERT OR IGNORE INTO accounts (id, kind, created_at) VALUES (?, ?, ?)",
            [(f"user:{u}", "user", now) for u in range(1, users + 1)]
            + [("lightning:in", "lightning", now)],
        )
        start = conn.execute("SELECT COALESCE(MAX(id), 0) FROM transactions").fetchone()[0]
        count = postings // 2
        conn.executemany(
            "INSERT INTO transactions (id, idempotency_key, kind, created_at)"
            " VALUES (?, ?, 'topup', ?)",
            ((start + i, f"bench-fill:{i}", now) for i in range(1, count + 1)),
        )
        conn.executemany(
            "INSERT INTO postings (tx_id, account, amount_msat) VALUES (?, ?, ?)",
            (
                row
                for i in range(1, count + 1)
                for row in (
                    (start + i, f"user:{i % users + 1}", 1000),
                    (start + i, "lightning:in", -1000),
                )
            ),
        )
        conn.execute(
            "UPDATE accounts SET balance_msat ="
            " (SELECT COALESCE(SUM(amount_msat), 0) FROM postings WHERE account = accounts.id)"
            " WHERE id LIKE 'user:%' OR id = 'lightning:in'"
        )
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def started_in(tmp: str) -> tuple[trio.Process, str, dict[str, str], float]:
    t = time.perf_counter()
    gateway, url, env = await start_gateway(tmp, {"ROUTECAT_REGISTER_LIMIT_PER_HOUR": "1000000"})
    return gateway, url, env, time.perf_counter() - t


async def bench_growth(key_counts: list[int], postings: int, jobs: int) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    gateway_cores, other_cores = cores()
    os.sched_setaffinity(0, other_cores)
    tmp = tempfile.mkdtemp(prefix="routecat-growth-")
    database = f"{tmp}/scale.db"

    async def with_gateway(fn: Callable[[trio.Process, str, dict[str, str]], Any]) -> float:
        gateway, url, env, took = await started_in(tmp)
        pin(gateway.pid, gateway_cores)
        host, port = url.split("//")[1].split(":")
        node = FakeNode(host, int(port), 64, None, "fast:1b")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.run, nursery)
                await node.welcomed.wait()
                await fn(gateway, url, env)
                nursery.cancel_scope.cancel()
        finally:
            await terminate(gateway, 20)
        return took

    async def keys_phase(gateway: trio.Process, url: str, env: dict[str, str]) -> None:
        keys: list[str] = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            for _ in range(max(key_counts)):
                r = await c.post("/v1/auth/register", json={"name": "growth"})
                keys.append(r.json()["api_key"])
        await trio.to_thread.run_sync(credit_all, database, 1_000_000)
        for n in key_counts:
            # Every key used in the measured phase (and once before it, not measured).
            cpu, p50, p99, _ = await load(url, keys[:n], max(jobs, n), gateway.pid)
            rows.append(
                (
                    f"{n} keys in use (c=16)",
                    f"{cpu:.2f} ms of gateway CPU per request, p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                )
            )
            print(rows[-1], flush=True)

    small = await with_gateway(keys_phase)
    rows.append(("start-up (empty ledger) to listening", f"{small:.2f} s"))
    keys_now: list[str] = []

    async def one_key(gateway: trio.Process, url: str, env: dict[str, str]) -> None:
        async with httpx.AsyncClient(base_url=url) as c:
            keys_now.append(
                (await c.post("/v1/auth/register", json={"name": "big"})).json()["api_key"]
            )
        await trio.to_thread.run_sync(credit_all, database, 1_000_000)
        cpu, p50, p99, _ = await load(url, keys_now, jobs, gateway.pid)
        rows.append(
            (
                f"settlement on a ledger of {before_postings:,} postings (c=16)",
                f"{cpu:.2f} ms of gateway CPU per request, p50 {p50:.1f} ms, p99 {p99:.1f} ms",
            )
        )
        print(rows[-1], flush=True)

    before_postings = count_postings(database)
    await with_gateway(one_key)
    if not postings:
        return rows
    t = time.perf_counter()
    await trio.to_thread.run_sync(fill_ledger, database, postings)
    rows.append(
        (f"writing {postings:,} postings (bulk, for the bench)", f"{time.perf_counter() - t:.0f} s")
    )
    before_postings = count_postings(database)
    big = await with_gateway(one_key)
    rows.append((f"start-up with {before_postings:,} postings to listening", f"{big:.2f} s"))
    env = {**os.environ, "ROUTECAT_DATABASE": database}
    t = time.perf_counter()
    check = await trio.run_process(
        [sys.executable, "-m", "routecat", "ledger", "check"],
        env=env,
        capture_stdout=True,
        check=False,
    )
    rows.append(
        (
            f"routecat ledger check on {count_postings(database):,} postings",
            f"{time.perf_counter() - t:.1f} s (exit {check.returncode})",
        )
    )
    return rows


def count_postings(database: str) -> int:
    import sqlite3

    conn = sqlite3.connect(database)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM postings").fetchone()[0])
    finally:
        conn.close()


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(
            f"the file-descriptor hard limit is {hard}; this bench needs {needed}"
            " (raise it with ulimit -Hn as root, or use a smaller size)"
        )
    return hard


async def main() -> None:
    which = option("--scale", "all")
    count = int(option("--streams", "10000"))
    sizes = [int(n) for n in option("--nodes", "100,1000,10000").split(",")]
    raise_fd_limit(max(count, max(sizes)) + 500)
    rows: list[tuple[str, str]] = []
    if which in ("all", "streams"):
        rows += await bench_streams(count, float(option("--seconds", "30")))
    if which in ("all", "nodes"):
        rows += await bench_nodes(sizes, int(option("--jobs", "2000")), option("--heartbeat"))
    if which in ("all", "growth"):
        keys = [int(n) for n in option("--keys", "1,100,10000").split(",")]
        postings = int(option("--postings", "10000000"))
        rows += await bench_growth(keys, postings, int(option("--jobs", "2000")))
    print(f"\nRouteCat scale bench ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')})\n")
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    path = Path(option("--json", "bench-scale.json"))
    path.write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": dict(rows)}, indent=2) + "\n"
    )
    print(f"\nJSON: {path.resolve()}")


if __name__ == "__main__":
    trio.run(main)
