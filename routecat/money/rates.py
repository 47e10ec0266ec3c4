"""The BTC/USD rate feed.

Invariants: a rate is never 0, negative, NaN or infinite (a source answering 0 is a
failed source); the rate in force is the median of the sources that answered the
last refresh, and its age is always known, so admission can refuse paid requests
when it is too old (``pricing_unavailable``) instead of pricing at a stale rate.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import attrs
import httpx
import trio

from routecat.clock import Clock
from routecat.config import Config
from routecat.errors import ConfigError
from routecat.metrics import Metrics

log = logging.getLogger("routecat.rates")

# The embedded default (dev wallet, no configuration) prices at this documented
# constant, shown as "pinned (dev default)" in /v1/stats. A real Lightning backend
# uses live sources unless the operator pins a rate.
DEV_BTC_USD = Decimal("100000")
MAX_RESPONSE_BYTES = 256 * 1024


def _positive(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        result = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None
    return result if result.is_finite() and result > 0 else None


def _dig(data: Any, *path: str | int) -> Any:
    for step in path:
        if isinstance(step, int):
            if not isinstance(data, list) or len(data) <= step:
                return None
        elif not isinstance(data, dict) or step not in data:
            return None
        data = data[step]
    return data


SOURCES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "coinbase": (
        "https://api.coinbase.com/v2/exchange-rates?currency=BTC",
        lambda d: _dig(d, "data", "rates", "USD"),
    ),
    "kraken": (
        "https://api.kraken.com/0/public/Ticker?pair=XBTUSD",
        lambda d: _dig(d, "result", "XXBTZUSD", "c", 0),
    ),
    "bitstamp": ("https://www.bitstamp.net/api/v2/ticker/btcusd/", lambda d: _dig(d, "last")),
    "coingecko": (
        "https://api.coingecko.com/api/v3/simple/price?ids=bitcoin&vs_currencies=usd",
        lambda d: _dig(d, "bitcoin", "usd"),
    ),
    "mempool": ("https://mempool.space/api/v1/prices", lambda d: _dig(d, "USD")),
}


@attrs.define(eq=False)
class RateFeed:
    """The BTC/USD rate in force, refreshed from several public sources."""

    config: Config
    metrics: Metrics
    clock: Clock
    urls: dict[str, str] = attrs.Factory(dict)  # source -> URL (tests point these at local servers)
    rate: Decimal | None = None
    fetched_at: float | None = None
    source: str = ""
    answered: list[str] = attrs.Factory(list)
    pinned: bool = False
    source_timeout: float = 10.0

    def __attrs_post_init__(self) -> None:
        if self.config.btc_usd is not None:
            self.rate, self.pinned, self.source = self.config.btc_usd, True, "pinned"
        elif self.config.lightning == "dev" and self.config.rate_mode == "auto":
            self.rate, self.pinned, self.source = DEV_BTC_USD, True, "pinned (dev default)"
        overrides = dict(entry.split("=", 1) for entry in self.config.rate_urls if "=" in entry)
        for name in self.config.rate_sources:
            if name not in SOURCES:
                raise ConfigError(f"unknown rate source {name!r}; known: {', '.join(SOURCES)}")
            self.urls.setdefault(name, overrides.get(name, SOURCES[name][0]))

    def age(self) -> float | None:
        if self.pinned:
            return 0.0
        return None if self.fetched_at is None else max(0.0, self.clock.wall() - self.fetched_at)

    def fresh_rate(self) -> Decimal | None:
        """The rate paid requests may use: known and younger than the maximum age."""
        age = self.age()
        if self.rate is None or age is None or age > self.config.rate_max_age:
            return None
        return self.rate

    def last_rate(self) -> Decimal | None:
        """The rate free requests may use: the last known one, however old."""
        return self.rate

    def describe(self) -> dict[str, Any]:
        age = self.age()
        return {
            "btc_usd": float(self.rate) if self.rate is not None else None,
            "btc_usd_source": self.source or None,
            "btc_usd_age_s": None if age is None else round(age, 1),
            "btc_usd_sources": list(self.answered),
        }

    async def _fetch_one(self, client: httpx.AsyncClient, name: str) -> Decimal | None:
        url = self.urls[name]
        parse = SOURCES[name][1]
        try:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    return None
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_RESPONSE_BYTES:
                        return None
            return _positive(parse(json.loads(body)))
        except Exception:  # any trouble with one source is that source's silence
            return None

    async def refresh(self, client: httpx.AsyncClient) -> Decimal | None:
        """One round over every source; keeps the last good rate when none answers."""
        found: dict[str, Decimal] = {}

        async def one(name: str) -> None:
            with trio.move_on_after(self.source_timeout):
                value = await self._fetch_one(client, name)
                if value is not None:
                    found[name] = value

        async with trio.open_nursery() as nursery:
            for name in self.urls:
                nursery.start_soon(one, name)
        if not found:
            log.warning("no BTC/USD source answered; keeping the last rate")
            return None
        self.rate = Decimal(statistics.median(found.values()))
        self.fetched_at = self.clock.wall()
        self.answered = sorted(found)
        self.source = "median of " + ", ".join(self.answered)
        self.metrics.btc_usd.set(float(self.rate))
        self.metrics.btc_usd_sources.set(len(found))
        log.info("BTC/USD %s from %d sources", self.rate, len(found))
        return self.rate

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.pinned:
            assert self.rate is not None
            self.metrics.btc_usd.set(float(self.rate))
            task_status.started()
            await trio.sleep_forever()
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            await self.refresh(client)
            task_status.started()
            while True:
                age = self.age()
                if age is not None:
                    self.metrics.btc_usd_age.set(age)
                await trio.sleep(self.config.rate_refresh)
                await self.refresh(client)
