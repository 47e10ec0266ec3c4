"""The gateway's services, wired once by ``serve`` and injected into the web app.

No module holds state: everything a view needs hangs off one ``Gateway`` value.
"""

from __future__ import annotations

import time

import attrs
import httpx

from ledger.store import Store
from routecat.api.clientip import IPNetwork, parse_networks
from routecat.api.ratelimit import SlidingWindow
from routecat.billing import Billing
from routecat.config import Config
from routecat.keys import KeyRing
from routecat.lightning.backend import Backend
from routecat.lightning.factory import make_backend
from routecat.lightning.lnurl import Resolver
from routecat.lightning.payouts import Payouts
from routecat.lightning.topups import Topups
from routecat.metrics import Metrics
from routecat.network.jobs import JobSpec
from routecat.network.registry import Registry
from routecat.network.reputation import Reputation
from routecat.network.scheduler import Scheduler
from routecat.pricing import Catalog, RateFeed, load_catalog
from routecat.version import git_commit, package_version


@attrs.define(eq=False)
class Gateway:
    config: Config
    store: Store
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
    billing: Billing
    catalog: Catalog
    rates: RateFeed
    reputation: Reputation
    lightning: Backend
    topups: Topups
    payouts: Payouts
    started_at: float = attrs.field(factory=time.time)
    ready: bool = False
    url: str = ""

    async def admit(self, spec: JobSpec) -> JobSpec:
        return await self.billing.admit(spec)

    async def release(self, spec: JobSpec) -> None:
        await self.billing.release(spec)

    @classmethod
    def build(cls, config: Config, store: Store) -> Gateway:
        metrics = Metrics()
        catalog = load_catalog(config)
        registry = Registry(store, metrics, catalog_models=frozenset(catalog.models))
        rates = RateFeed(config, metrics)
        reputation = Reputation(registry)
        billing = Billing(store, config, catalog, rates, registry, reputation, metrics)
        scheduler = Scheduler(config, registry, metrics, billing.settle)
        lightning = make_backend(config, store)
        resolver = Resolver(
            httpx.AsyncClient(timeout=10, follow_redirects=False),
            allow_private=config.lnurl_allow_private,
            base_url_override=config.lnurl_base_url_override,
        )
        return cls(
            config=config,
            store=store,
            keys=KeyRing(store),
            metrics=metrics,
            register_limit=SlidingWindow(
                config.register_limit_per_hour, 3600.0, what="registrations"
            ),
            request_limit=SlidingWindow(config.rate_limit_per_minute, 60.0),
            read_limit=SlidingWindow(config.read_limit_per_minute, 60.0),
            proxies=parse_networks(config.trusted_proxies),
            version=package_version(),
            commit=git_commit(),
            registry=registry,
            scheduler=scheduler,
            billing=billing,
            catalog=catalog,
            rates=rates,
            reputation=reputation,
            lightning=lightning,
            topups=Topups(store, config, lightning),
            payouts=Payouts(store, config, lightning, resolver, metrics),
        )
