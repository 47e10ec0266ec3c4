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

from ledger.store import Storage
from routecat.api.clientip import IPNetwork, parse_networks
from routecat.api.ratelimit import SlidingWindow
from routecat.clock import Clock
from routecat.config import Config
from routecat.db import schema
from routecat.metrics import Metrics
from routecat.money.admission import Admissions
from routecat.money.earnings import Earnings
from routecat.money.keys import KeyRing
from routecat.money.lightning.backend import Backend
from routecat.money.lightning.factory import make_backend
from routecat.money.lightning.lnurl import Resolver, address_problem
from routecat.money.lightning.payouts import Payouts
from routecat.money.lightning.topups import Topups
from routecat.money.pricing import Catalog, load_catalog
from routecat.money.rates import RateFeed
from routecat.money.settlement import Settlement
from routecat.network.registry import Registry
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
    register_limit: SlidingWindow
    request_limit: SlidingWindow
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
    started_at: float
    ready: bool = False
    url: str = ""


def _closing(close: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
    """An exit callback that closes even while the gateway is being cancelled."""

    async def shielded() -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await close()

    return shielded


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
        settlement = Settlement(store, config, admissions, reputation, earnings, metrics, clock)
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
            keys=KeyRing(store, clock=clock),
            metrics=metrics,
            register_limit=SlidingWindow(
                config.register_limit_per_hour, 3600.0, what="registrations", clock=clock.monotonic
            ),
            request_limit=SlidingWindow(config.rate_limit_per_minute, 60.0, clock=clock.monotonic),
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
            payouts=Payouts(store, config, lightning, resolver, metrics, clock=clock),
            started_at=clock.wall(),
        )
