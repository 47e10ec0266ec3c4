"""Sliding-window rate limits, in memory.

Invariant: at most ``limit`` acquisitions per key in any window of ``window`` seconds,
and a refusal says exactly when the next acquisition will succeed (``Retry-After``).
Refused attempts are not counted. Idle keys are pruned so memory stays bounded by
the keys active within one window. ``SlidingWindow`` keeps hits in memory (one
process); ``SharedWindow`` keeps them in the database, so replicas enforce one limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ledger.store import Storage
from routecat.db import cluster as cluster_db
from routecat.errors import RateLimited


@attrs.define(eq=False)
class SlidingWindow:
    limit: int
    window: float
    what: str = "requests"
    clock: Callable[[], float] = trio.current_time
    _hits: dict[str, deque[float]] = attrs.field(factory=dict)
    _calls: int = 0

    def acquire_nowait(self, key: str) -> None:
        """Count one hit for ``key`` or raise ``RateLimited`` with the exact wait."""
        now = self.clock()
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            wait = hits[0] + self.window - now if hits else self.window
            raise RateLimited(
                f"rate limit exceeded: {self.limit} {self.what} per {self.window:g} s;"
                f" retry in {wait:.1f} s",
                retry_after=wait,
            )
        hits.append(now)
        self._calls += 1
        if self._calls % 1024 == 0:
            self._prune(now)

    def _prune(self, now: float) -> None:
        stale = [k for k, h in self._hits.items() if not h or h[-1] <= now - self.window]
        for k in stale:
            del self._hits[k]

    async def acquire(self, key: str) -> None:
        self.acquire_nowait(key)

    def statistics(self) -> dict[str, int]:
        return {"keys": len(self._hits)}


class Limiter(Protocol):
    async def acquire(self, key: str) -> None:
        """Count one hit for ``key`` or raise ``RateLimited`` with the exact wait."""


@attrs.define(eq=False)
class SharedWindow:
    """The same sliding window, kept in the database: replicas that share it enforce
    one limit between them (each hit is one small write transaction)."""

    store: Storage
    limit: int
    window: float
    clock: Callable[[], float]  # wall clock: replicas compare times
    what: str = "requests"
    name: str = "requests"  # keeps the buckets of different limits apart

    async def acquire(self, key: str) -> None:
        now, bucket = self.clock(), f"{self.name}:{key}"
        wait = await self.store.write(
            lambda db: cluster_db.hit(db, bucket, now, self.window, self.limit)
        )
        if wait is not None:
            raise RateLimited(
                f"rate limit exceeded: {self.limit} {self.what} per {self.window:g} s;"
                f" retry in {wait:.1f} s",
                retry_after=wait,
            )
