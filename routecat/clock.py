"""The gateway's one clock, injected into every component that reads the time.

``monotonic`` measures durations and deadlines (trio's clock, so a test under
``autojump_clock`` or ``MockClock`` moves it); ``wall`` is UTC epoch seconds for what
is stored and shown (top-up expiry, the free tier's day, audit times). A test that
needs another time builds the gateway with its own ``Clock``.

The time formats: ``iso`` (stored ``*_at`` text columns, microseconds, ``Z``),
``rfc3339`` (shown to clients, whole seconds), ``utc_day`` (the free tier's day).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import trio


@attrs.define(eq=False)
class Clock:
    monotonic: Callable[[], float] = trio.current_time
    wall: Callable[[], float] = time.time

    def now_iso(self) -> str:
        return iso(self.wall())


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
