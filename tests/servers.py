"""Real servers for the integration tier: a gateway on port 0, owlrun nodes in front
of fake engines, and the helpers that register and fund keys against them."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from ledger import book
from ledger.store import Storage, Store
from routecat.config import Config
from routecat.gateway import Gateway
from routecat.server import serve_gateway
from tests import pgcluster
from tests.clients import MODEL, chat, topup, wait_for
from tests.fakes import Knobs, LnurlServer, start_engine, start_lnurl
from tests.rogue import ROGUE_MODEL


@attrs.define
class Running:
    gw: Gateway
    stop: trio.Event
    config: Config
    stopped: trio.Event = attrs.Factory(trio.Event)  # set once the gateway has ended

    async def halt(self) -> None:
        """Stop the gateway and wait until it has ended (its files are then at rest)."""
        self.stop.set()
        await self.stopped.wait()

    @property
    def url(self) -> str:
        return self.gw.url

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


def database(tmp_path: Path, name: str = "routecat.db") -> str:
    """Where a test keeps its data: a fresh PostgreSQL database when the suite runs
    against PostgreSQL (``nox -s postgres``), else a SQLite file in ``tmp_path``."""
    admin = os.environ.get(pgcluster.ENV)
    return pgcluster.fresh_database(admin) if admin else str(tmp_path / name)


def on_postgres() -> bool:
    return bool(os.environ.get(pgcluster.ENV))


def open_test_store(tmp_path: Path, name: str = "test.db") -> Storage:
    """A store with no tables yet (the caller migrates what it needs)."""
    url = database(tmp_path, name)
    if on_postgres():
        from ledger.postgres import PostgresStore

        return PostgresStore.open(url)
    return Store.open(url)


def reopen(database: str) -> Storage:
    """The store of a gateway that ran on ``database`` (tables already migrated)."""
    from routecat.db.schema import open_store

    return open_store(database)


def everything_stored(database: str) -> bytes:
    """Every byte the database holds: the SQLite files, or every row of every table."""
    if not on_postgres():
        return b"".join(
            p.read_bytes()
            for p in Path(database).parent.glob(Path(database).name + "*")
            if p.is_file()
        )
    import psycopg

    out = []
    with psycopg.connect(database) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        for (table,) in tables:
            for (row,) in conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" t'):
                out.append(row.encode())
    return b"\n".join(out)


def make_config(tmp_path: Path, environ: dict[str, str] | None = None, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "database": database(tmp_path),
        "port": 0,
        "register_limit_per_hour": 1000,
        "log_level": "WARNING",
        "btc_usd": "100000",
    }
    settings.update(overrides)
    from routecat.config import load_config

    return load_config(flags=settings, environ=environ or {})


async def start_gateway(nursery: trio.Nursery, config: Config) -> Running:
    stop, stopped = trio.Event(), trio.Event()

    async def serving(task_status: trio.TaskStatus[Gateway]) -> None:
        try:
            await serve_gateway(config, stop=stop, task_status=task_status)
        finally:
            stopped.set()

    gw = await nursery.start(serving)
    return Running(gw, stop, config, stopped)


async def register(client: httpx.AsyncClient, name: str = "test") -> str:
    r = await client.post("/v1/auth/register", json={"name": name})
    assert r.status_code == 200, r.text
    key = r.json()["api_key"]
    assert isinstance(key, str)
    return key


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in response.text
    return dict(error)


import secrets  # noqa: E402

from owlrun.agent import Agent  # noqa: E402
from owlrun.engines import OllamaEngine, OpenAIEngine  # noqa: E402
from owlrun.errors import RefusedError  # noqa: E402
from owlrun.identity import Identity  # noqa: E402
from tests.fakes import FakeEngine  # noqa: E402


@attrs.define(eq=False)
class Node:
    agent: Agent
    scope: trio.CancelScope
    stopped: trio.Event
    refused: list[RefusedError]

    @property
    def id(self) -> str:
        return self.agent.identity.node_id

    async def kill(self) -> None:
        """Abrupt death: the agent's task is cancelled, its socket dropped."""
        self.scope.cancel()
        await self.stopped.wait()


async def start_node(
    nursery: trio.Nursery,
    gateway_url: str,
    engine: FakeEngine,
    *,
    backend: str = "ollama",
    max_jobs: int = 4,
    identity: Identity | None = None,
    payout_address: str = "",
    models: tuple[str, ...] = (),
) -> Node:
    identity = identity or Identity("node_" + secrets.token_hex(6), secrets.token_urlsafe(24))
    client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
    eng = (
        OllamaEngine(engine.url, client)
        if backend == "ollama"
        else OpenAIEngine(engine.url, client)
    )
    agent = Agent(
        gateway=gateway_url,
        identity=identity,
        engine=eng,
        max_jobs=max_jobs,
        allowed_models=models,
        payout_address=payout_address,
        model_refresh=0.3,
    )
    scope = trio.CancelScope()
    stopped = trio.Event()
    refused: list[RefusedError] = []

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                async with client:
                    await agent.run(task_status=task_status)
        except RefusedError as exc:
            if not agent.sessions:
                raise
            refused.append(exc)  # refused on a reconnect: the test looks at it
        finally:
            stopped.set()

    await nursery.start(run)
    return Node(agent, scope, stopped, refused)


def network_config(
    tmp_path: Path, environ: dict[str, str] | None = None, **overrides: Any
) -> Config:
    settings: dict[str, Any] = {
        "heartbeat_interval": "0.5",
        "queue_timeout": "3",
        "first_token_timeout": "5",
        "inter_token_timeout": "3",
        "keepalive_interval": "0.5",
        "drain_timeout": "2",
        "rate_limit_per_minute": "100000",
    }
    settings.update(overrides)
    return make_config(tmp_path, environ, **settings)


@attrs.define(eq=False)
class Network:
    gateway: Running
    engine: FakeEngine
    nodes: list[Node]
    key: str
    settled: dict[str, int]

    @property
    def url(self) -> str:
        return self.gateway.url

    def client(self) -> httpx.AsyncClient:
        return self.gateway.client(headers={"Authorization": f"Bearer {self.key}"})


async def start_network(
    nursery: trio.Nursery,
    tmp_path: Path,
    *,
    nodes: int = 1,
    knobs: Knobs | None = None,
    backend: str = "ollama",
    max_jobs: int = 4,
    credit_sats: int = 1_000_000,
    environ: dict[str, str] | None = None,
    **overrides: Any,
) -> Network:
    gateway = await start_gateway(nursery, network_config(tmp_path, environ, **overrides))
    settled: dict[str, int] = {}
    inner = gateway.gw.scheduler.on_complete

    async def counting(result: Any) -> Any:
        settled[result.spec.job_id] = settled.get(result.spec.job_id, 0) + 1
        return await inner(result)

    gateway.gw.scheduler.on_complete = counting
    engine = await start_engine(nursery, knobs)
    started = [
        await start_node(nursery, gateway.url, engine, backend=backend, max_jobs=max_jobs)
        for _ in range(nodes)
    ]
    async with gateway.client() as c:
        key = await register(c)
    if credit_sats:
        await fund(gateway, key, credit_sats)
    return Network(gateway, engine, started, key, settled)


async def fund(gateway: Running, key: str, sats: int) -> None:
    """Credit a key from operator equity, as `routecat keys credit` does."""
    from routecat.money.keys import hash_key
    from routecat.money.settlement import credit

    def write(db: Any) -> None:
        key_id = db.execute(
            "SELECT id FROM api_keys WHERE key_hash = ?", (hash_key(key),)
        ).fetchone()[0]
        credit(db, key_id, sats * 1000, "test funding", "test:" + secrets.token_hex(8))

    await gateway.gw.store.write(write)


# Prices of the money tests: USD per 1M tokens.
CATALOG = """
[default]
input = "500"
output = "500"
[models."llama3.1:8b"]
input = "1000"
output = "2000"
"""


def catalog(tmp_path: Path) -> str:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    return str(path)


async def balance(net: Network, key: str | None = None) -> dict[str, int]:
    async with net.gateway.client(headers={"Authorization": f"Bearer {key or net.key}"}) as c:
        r = await c.get("/v1/auth/balance")
        assert r.status_code == 200, r.text
        return dict(r.json())


async def ledger_ok(net: Network) -> None:
    result = await net.gateway.gw.store.read(book.check)
    assert result.ok, result


async def earn(
    nursery: trio.Nursery,
    tmp_path: Path,
    mode: str = "good",
    stock: Any = None,
    **overrides: Any,
) -> tuple[Network, LnurlServer]:
    """A network whose node has a Lightning Address on a local LNURL server, and has
    earned over its 100-sat threshold from paid jobs; the dev wallet is funded. The node
    is a native one, or ``stock`` (a ``tests.stock_agent.StockAgent``, which this points
    at the gateway and its engine and starts)."""
    lnurl = await start_lnurl(nursery, mode)
    settings = {
        "catalog": catalog(tmp_path),
        "lnurl_base_url_override": lnurl.url,
        "payout_interval": "0.2",
        "payout_threshold_sats": "100",
        "free_daily_requests": "0",  # paid jobs: payable at once
        "owlrun_compat": "true" if stock is not None else "false",
        **overrides,
    }
    net = await start_network(nursery, tmp_path, nodes=0, **settings)
    engine = await start_engine(nursery, Knobs())
    gw = net.gateway.gw
    if stock is None:
        node = await start_node(nursery, net.url, engine, payout_address="alice@provider.example")
        net.nodes.append(node)
    else:
        stock.gateway, stock.engine_url = net.url, engine.url
        await nursery.start(stock.run)
        await wait_for(lambda: stock.node_id in gw.registry.nodes, timeout=10)
    # Fund the operator's dev wallet: a customer tops up 5,000 sats.
    async with net.client() as c:
        body = await topup(c, 5000)
        await gw.lightning.settle_own(body["invoice"])  # type: ignore[attr-defined]
        gw.topups.wake()
        await wait_for(lambda: gw.topups.credited == 1)
        for i in range(12):  # each paid job earns the provider ~10.45 sats
            r = await c.post("/v1/chat/completions", json=chat(f"job {i}", max_tokens=2000))
            assert r.status_code == 200, r.text
    return net, lnurl


@attrs.define(eq=False)
class Relay:
    """A TCP relay to ``target`` (``host:port``, settable after it starts) that counts
    the connections it accepted and can play a dead path: ``freeze()`` makes every
    connection open now swallow whatever either end sends, its close included (a cable
    pulled, a NAT entry gone), while new connections pass as before. A frozen
    connection lasts as long as the relay."""

    url: str = ""
    target: tuple[str, int] | None = None
    accepted: int = 0
    frozen_up_to: int = 0  # connections numbered up to this one are dead paths

    def freeze(self) -> None:
        self.frozen_up_to = self.accepted


async def start_relay(nursery: trio.Nursery, target: str | None = None) -> Relay:
    relay = Relay()
    if target is not None:
        host, port = target.split("//")[-1].rsplit(":", 1)
        relay.target = (host, int(port))

    async def serve(client: trio.SocketStream) -> None:
        relay.accepted += 1
        number = relay.accepted
        assert relay.target is not None

        async def one_way(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await source.receive_some(65536):
                    if number > relay.frozen_up_to:
                        await sink.send_all(data)
            if number <= relay.frozen_up_to:
                await trio.sleep_forever()  # a dead path carries no close either
            pair.cancel_scope.cancel()  # either side's end ends both

        async with (
            client,
            await trio.open_tcp_stream(*relay.target) as server,
            trio.open_nursery() as pair,
        ):
            pair.start_soon(one_way, client, server)
            pair.start_soon(one_way, server, client)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    relay.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return relay


class LiveGateway:
    """A gateway, a fake engine and one honest owlrun node in a thread of their own.
    (A plain class: hypothesis pretty-prints attrs instances field by field, and these
    fields change under it in the other thread.)"""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.gw: Gateway | None = None
        self.url = ""
        self.paid_key = ""
        self.free_key = ""
        self.token: trio.lowlevel.TrioToken | None = None
        self.error: BaseException | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LiveGateway({self.url})"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(60) or self.error is not None:
            raise RuntimeError(f"the live gateway did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc  # start() reports a failure to start
            self._ready.set()
            raise  # and a crash later still fails the test (pytest's thread hook)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        config = network_config(
            self.tmp,
            first_token_timeout="1.5",
            inter_token_timeout="1.5",
            queue_timeout="1",
            sweep_interval="1",
            free_daily_requests="1000000",
            free_daily_budget_sats="100000000",
            catalog=self._catalog(),
        )
        async with trio.open_nursery() as nursery:
            running = await start_gateway(nursery, config)
            self.gw, self.url = running.gw, running.url
            engine = await start_engine(nursery, Knobs())
            await start_node(nursery, self.url, engine, max_jobs=16)
            async with running.client() as c:
                self.paid_key = await register(c, "paid")
                self.free_key = await register(c, "free")
            await fund(running, self.paid_key, 10_000_000)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()  # the gateway, its node and the engine

    def _catalog(self) -> str:
        path = self.tmp / "catalog.toml"
        # The honest model and the rogue's free model are listed (free requests); the
        # rogue's paid model is not (paid requests, from a funded key: tests.rogue).
        path.write_text(
            f'[default]\ninput = "500"\noutput = "500"\n'
            f'[models."{MODEL}"]\ninput = "500"\noutput = "500"\n'
            f'[models."{ROGUE_MODEL}"]\ninput = "500"\noutput = "500"\n'
        )
        return str(path)

    def call(self, fn: Callable[[Gateway], Any]) -> Any:
        """Run an async function of the gateway in its own thread; return its result."""
        assert self.gw is not None
        gw = self.gw

        async def run() -> Any:
            return await fn(gw)

        return trio.from_thread.run(run, trio_token=self.token)

    def stop(self) -> None:
        if self._stop is not None and self.token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
        if self._thread is not None:
            self._thread.join(30)
