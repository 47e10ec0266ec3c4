"""Paid admission with reservations in memory (one SQLite process): the check and the
reservation are atomic, a reservation ends only when told, and a busy ledger read is
retried, then refused in words (never admitted unchecked)."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import trio

from ledger import book
from ledger.store import Store
from routecat.clock import Clock
from routecat.config import Config
from routecat.db.schema import open_store
from routecat.errors import InsufficientBalance, ServiceUnavailable
from routecat.metrics import Metrics
from routecat.money.admission import PEEK_ATTEMPTS, Admissions
from routecat.money.pricing import load_catalog
from routecat.money.rates import RateFeed
from routecat.money.settlement import credit
from routecat.network.jobs import JobSpec


def admissions(tmp_path: Path, credit_msat: int) -> Admissions:
    store = open_store(str(tmp_path / "a.db"))
    assert isinstance(store, Store)
    store.write_sync(lambda db: credit(db, 1, credit_msat, "test", "credit:1"))
    config, clock = Config(), Clock()
    rates = RateFeed(config, Metrics(), clock, rate=Decimal("100000"), pinned=True)
    gate = Admissions(store, config, load_catalog(config), rates, clock)
    gate.peek = store.peek
    return gate


def spec(job_id: str) -> JobSpec:
    # A model outside the free catalog: paid; its reservation is its maximum cost.
    return JobSpec(job_id, "chat", "not-free:1b", {}, False, 1, 1000, 100)


async def test_one_balance_admits_one_request_until_its_reservation_ends(
    tmp_path: Path,
) -> None:
    gate = admissions(tmp_path, 1)  # 1 msat: room for one admission
    try:
        first = await gate.admit(spec("job-1"))
        assert first.admission.reserved_msat > 0
        assert gate.held("user:1") == first.admission.reserved_msat
        with pytest.raises(InsufficientBalance):
            await gate.admit(spec("job-2"))
        gate.settled("job-1")  # its settlement committed
        assert gate.held("user:1") == 0
        third = await gate.admit(spec("job-3"))
        await gate.release(third)  # never started: nothing was written
        assert gate.held("user:1") == 0
        assert gate.store.read_sync(lambda db: book.balance(db, "user:1")) == (1, 0)
    finally:
        gate.store.close()


async def test_a_busy_ledger_read_is_retried_then_refused(tmp_path: Path) -> None:
    gate = admissions(tmp_path, 10**9)
    real = gate.peek
    assert real is not None
    failures = [PEEK_ATTEMPTS - 1]

    def flaky(fn: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real(fn)

    try:
        gate.peek = flaky
        with trio.fail_after(5):
            await gate.admit(spec("job-1"))  # the last attempt reads
        assert gate.held("user:1") > 0
        failures[0] = PEEK_ATTEMPTS
        with pytest.raises(ServiceUnavailable):
            await gate.admit(spec("job-2"))
        assert "job-2" not in gate.open_reservations
    finally:
        gate.store.close()
