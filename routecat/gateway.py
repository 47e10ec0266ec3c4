"""The gateway's components, wired once, owned by one context manager.

Invariants: ``open_gateway`` is the only place that builds components and the only
owner of their resources (the store, HTTP clients, the Lightning backend): whatever
happens inside the ``async with``, each is closed once on the way out, in reverse
order. No module holds state; every component gets the one ``Clock``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import httpx
import trio

from ledger.store import Storage, Store
from routecat.api.clientip import IPNetwork, parse_networks
from routecat.api.ratelimit import Limiter, SharedWindow, SlidingWindow
from routecat.clock import Clock
from routecat.config import Config
from routecat.db import schema
from routecat.db.schema import is_postgres
from routecat.metrics import Metrics
from routecat.money.admission import Admissions
from routecat.money.earnings import Earnings
from routecat.money.keys import KEYS_EPOCH, KeyRing
from routecat.money.lightning.backend import Backend
from routecat.money.lightning.factory import make_backend
from routecat.money.lightning.lnurl import Resolver, address_problem
from routecat.money.lightning.payouts import Payouts
from routecat.money.lightning.topups import Topups
from routecat.money.pricing import Catalog, load_catalog
from routecat.money.rates import RateFeed
from routecat.money.settlement import Settlement
from routecat.network.cluster import Cluster
from routecat.network.registry import BANS_EPOCH, Registry
from routecat.network.remote import Forwarder
from routecat.network.reputation import Reputation
from routecat.network.scheduler import Scheduler
from routecat.version import git_commit, package_version

CLOSE_TIMEOUT = 5.0


@attrs.define(eq=False)
class Gateway:
    config: Config
    clock: Clock
    store: Storage
    keys: KeyRing
    metrics: Metrics
    register_limit: Limiter
    request_limit: Limiter
    read_limit: SlidingWindow
    proxies: tuple[IPNetwork, ...]
    version: str
    commit: str
    registry: Registry
    scheduler: Scheduler
    admissions: Admissions
    settlement: Settlement
    earnings: Earnings
    catalog: Catalog
    rates: RateFeed
    reputation: Reputation
    lightning: Backend
    topups: Topups
    payouts: Payouts
    cluster: Cluster
    forwarder: Forwarder
    started_at: float
    ready: bool = False
    url: str = ""


def _closing(close: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
    """An exit callback that closes even while the gateway is being cancelled."""

    async def shielded() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await close()

    return shielded


def limiter(
    store: Storage, config: Config, limit: int, window: float, clock: Clock, what: str = "requests"
) -> Limiter:
    """A limit shared by every replica on PostgreSQL, in memory on SQLite (one process)."""
    if is_postgres(config.database):
        return SharedWindow(store, limit, window, clock.wall, what=what, name=what)
    return SlidingWindow(limit, window, what=what, clock=clock.monotonic)


@contextlib.asynccontextmanager
async def open_gateway(
    config: Config, *, clock: Clock | None = None, store: Storage | None = None
) -> AsyncIterator[Gateway]:
    """Build every component for ``config``; close what they hold on exit.

    ``store`` is for tools that already hold one (benchmarks); it is then theirs to close.
    """
    clock = clock or Clock()
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = schema.open_store(config.database)
            stack.callback(store.close)
        metrics = Metrics()
        catalog = load_catalog(config)
        registry = Registry(
            store,
            metrics,
            clock=clock,
            catalog_models=frozenset(catalog.models),
            address_problem=address_problem,
        )
        rates = RateFeed(config, metrics, clock=clock)
        reputation = Reputation(registry, clock=clock)
        admissions = Admissions(store, config, catalog, rates, clock)
        earnings = Earnings(store, registry, clock)
        cluster = Cluster(store, config, registry, clock, shared=is_postgres(config.database))
        admissions.holder = cluster.id
        if isinstance(store, Store):  # one process: paid reservations in memory
            admissions.peek = store.peek
        settlement = Settlement(
            store, config, admissions, reputation, earnings, metrics, clock, cluster.alive_others
        )
        keys = KeyRing(store, clock=clock)
        if isinstance(store, Store):  # one process: keys read on the event loop
            keys.peek = store.peek
        cluster.on_epoch[KEYS_EPOCH] = keys.invalidated
        cluster.on_epoch[BANS_EPOCH] = registry.close_banned
        # Jobs forwarded to other replicas stream for as long as a job runs: no read
        # timeout here (the scheduler's first- and inter-token timeouts apply).
        forward_client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        stack.push_async_callback(_closing(forward_client.aclose))
        forwarder = Forwarder(config, registry, clock, forward_client)
        cluster.on_directory = forwarder.update
        lightning = make_backend(config, store, clock)
        stack.push_async_callback(_closing(lightning.close))
        lnurl_client = httpx.AsyncClient(timeout=10, follow_redirects=False)
        stack.push_async_callback(_closing(lnurl_client.aclose))
        resolver = Resolver(
            lnurl_client,
            allow_private=config.lnurl_allow_private,
            base_url_override=config.lnurl_base_url_override,
        )
        yield Gateway(
            config=config,
            clock=clock,
            store=store,
            keys=keys,
            metrics=metrics,
            register_limit=limiter(
                store, config, config.register_limit_per_hour, 3600.0, clock, "registrations"
            ),
            request_limit=limiter(store, config, config.rate_limit_per_minute, 60.0, clock),
            read_limit=SlidingWindow(config.read_limit_per_minute, 60.0, clock=clock.monotonic),
            proxies=parse_networks(config.trusted_proxies),
            version=package_version(),
            commit=git_commit(),
            registry=registry,
            scheduler=Scheduler(config, registry, metrics, settlement.settle, clock=clock),
            admissions=admissions,
            settlement=settlement,
            earnings=earnings,
            catalog=catalog,
            rates=rates,
            reputation=reputation,
            lightning=lightning,
            topups=Topups(store, config, lightning, clock=clock),
            payouts=Payouts(
                store, config, lightning, resolver, metrics, clock=clock, holder=cluster.id
            ),
            cluster=cluster,
            forwarder=forwarder,
            started_at=clock.wall(),
        )
