"""The ledger alone: exact money arithmetic and invariants under random operations."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings

from ledger import book
from ledger.errors import Unbalanced
from ledger.money import cost_msat, split
from tests.servers import open_test_store


def test_cost_is_exact_and_rounded_up_once() -> None:
    # 1 token at $0.05 per 1M at $100,000/BTC is 0.05 msat: billed as 1 msat.
    assert cost_msat(1, 0, Decimal("0.05"), Decimal("0.10"), Decimal("100000")) == 1
    # 1M input + 1M output tokens at $0.05 + $0.10 = $0.15 = 150 sats at $100,000.
    assert cost_msat(10**6, 10**6, Decimal("0.05"), Decimal("0.10"), Decimal("100000")) == 150_000
    # No float error: 3 tokens at $0.1/1M at $30,000 is exactly 1000/1000 msat.
    assert cost_msat(3, 0, Decimal("0.1"), Decimal("0"), Decimal("30000")) == 1
    assert cost_msat(0, 0, Decimal("1"), Decimal("1"), Decimal("1")) == 0
    with pytest.raises(ValueError, match="never price"):
        cost_msat(1, 1, Decimal("1"), Decimal("1"), Decimal("0"))


prices = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)


@given(
    st.integers(min_value=-(10**9), max_value=10**12),
    st.integers(min_value=-(10**9), max_value=10**12),
    prices,
    prices,
    st.decimals(min_value=Decimal("0.01"), max_value=10**9, places=2),
)
def test_cost_is_the_ceiling_of_the_exact_rational_cost(
    prompt: int, completion: int, input_price: Decimal, output_price: Decimal, rate: Decimal
) -> None:
    exact = (
        Fraction(prompt) * Fraction(input_price) + Fraction(completion) * Fraction(output_price)
    ) * (Fraction(100_000_000_000) / (Fraction(1_000_000) * Fraction(rate)))
    assert cost_msat(prompt, completion, input_price, output_price, rate) == math.ceil(exact)


@given(st.integers(min_value=0, max_value=10**15))
def test_split_sums_to_cost(cost: int) -> None:
    provider, fee = split(cost)
    assert provider + fee == cost
    assert provider == cost * 95 // 100
    assert fee >= 0


def test_unbalanced_transaction_is_refused(tmp_path: Path) -> None:
    store = open_test_store(tmp_path, "l.db")
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    with pytest.raises(Unbalanced):
        store.write_sync(
            lambda db: book.post(db, "k", "x", [book.Posting("a:1", 5), book.Posting("b:1", -4)])
        )
    assert store.read_sync(book.check).transactions == 0
    store.close()


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("credit"), st.integers(0, 3), st.integers(1, 10**9)),
        st.tuples(st.just("reserve"), st.integers(0, 3), st.integers(0, 10**9)),
        st.tuples(st.just("settle"), st.integers(0, 3), st.integers(0, 10**9)),
        st.tuples(st.just("replay"), st.integers(0, 3), st.integers(0, 10**9)),
        st.tuples(st.just("release"), st.integers(0, 3), st.integers(0, 0)),
        st.tuples(st.just("sweep"), st.integers(0, 0), st.integers(0, 0)),
    ),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
# Two zero reservations on one msat of balance, then two settlements: each job costs
# at most what it reserved, so the user cannot owe a whole job (found by hypothesis).
@example(
    ops=[("credit", 0, 1), ("reserve", 0, 0), ("reserve", 0, 0), ("settle", 0, 1), ("settle", 0, 1)]
)
def test_random_operations_keep_every_invariant(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]
) -> None:
    store = open_test_store(tmp_path_factory.mktemp("ledger"), "l.db")
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    open_jobs: dict[str, tuple[int, int]] = {}  # job -> (user, reserved msat)
    settled: set[str] = set()
    counter = 0
    for op, user, amount in ops:
        counter += 1
        account = book.user_account(user)
        if op == "credit":
            store.write_sync(
                lambda db: book.post(
                    db,
                    f"c{counter}",
                    "credit",
                    [book.Posting(account, amount), book.Posting(book.OPERATOR_EQUITY, -amount)],
                )
            )
        elif op == "reserve":
            job = f"job{counter}"
            if store.write_sync(lambda db: book.reserve(db, job, account, amount, 0.0)):
                open_jobs[job] = (user, amount)
        elif op in ("settle", "replay") and open_jobs:
            job, (owner, reserved) = next(iter(open_jobs.items()))
            # A job never costs more than its reservation (its maximum cost).
            cost = min(amount, reserved)
            provider, fee = split(cost)

            def settle(db: object, job: str = job, owner: int = owner) -> object:
                book.release(db, job)  # type: ignore[arg-type]
                return book.post(
                    db,
                    f"job:{job}",
                    "job",
                    [
                        book.Posting(book.user_account(owner), -cost),
                        book.Posting("provider:n", provider),
                        book.Posting(book.OPERATOR_FEE, fee),
                    ],
                )  # type: ignore[arg-type]

            first = store.write_sync(settle)
            again = store.write_sync(settle)
            assert again is None  # exactly once, whatever replays
            assert first is not None or job in settled
            settled.add(job)
            if op == "settle":
                del open_jobs[job]
        elif op == "release" and open_jobs:
            job = next(iter(open_jobs))
            store.write_sync(lambda db: book.release(db, job))
            store.write_sync(lambda db: book.release(db, job))  # idempotent
            del open_jobs[job]
        elif op == "sweep":
            store.write_sync(lambda db: book.sweep_reservations(db, float("inf"), keep=open_jobs))
        result = store.read_sync(book.check)
        assert result.ok, result
    # No reservation outlives its job.
    store.write_sync(lambda db: book.sweep_reservations(db, float("inf")))
    left = store.read_sync(
        lambda db: db.execute(
            "SELECT COUNT(*), COALESCE(SUM(reserved_msat), 0) FROM reservations, accounts"
        ).fetchone()
    )
    assert left[0] == 0
    assert store.read_sync(book.check).ok
    store.close()


@pytest.mark.sqlite_only
async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    store = open_test_store(tmp_path, "g.db")
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(
                    store.write,
                    lambda db, i=i: book.post(
                        db,
                        f"t{i}",
                        "credit",
                        [book.Posting("user:1", 1), book.Posting(book.OPERATOR_EQUITY, -1)],
                    ),
                )

        with pytest.raises(RuntimeError, match="fails alone"):
            await store.write(
                lambda db: (_ for _ in ()).throw(RuntimeError("this write fails alone"))
            )
    assert store.writes == 200
    assert store.batches < 200  # concurrent writes shared transactions
    assert store.read_sync(lambda db: book.balance(db, "user:1")) == (200, 0)
    assert store.read_sync(book.check).ok
    store.close()


def top_up(db: book.Connection, key: str, amount: int) -> None:
    book.post(
        db,
        key,
        "topup",
        [book.Posting("user:1", amount), book.Posting(book.LIGHTNING_IN, -amount)],
    )


def test_peek_reads_committed_rows_on_the_calling_thread_without_waiting(
    tmp_path: Path,
) -> None:
    import sqlite3
    import threading

    from ledger.store import Store

    store = Store.open(str(tmp_path / "peek.db"))
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    try:
        store.write_sync(lambda db: top_up(db, "t1", 5_000))
        assert store.peek(lambda db: book.balance(db, "user:1")) == (5_000, 0)
        # A writer holding its transaction open (a batch being committed): the peek sees
        # the last commit at once (WAL), never the uncommitted rows, and never waits.
        inside, release = threading.Event(), threading.Event()

        def slow_write(db: object) -> None:
            top_up(db, "t2", 1_000)  # type: ignore[arg-type]
            inside.set()
            release.wait(10)

        writer = threading.Thread(target=store.write_sync, args=(slow_write,))
        writer.start()
        assert inside.wait(10)
        assert store.peek(lambda db: book.balance(db, "user:1")) == (5_000, 0)
        release.set()
        writer.join()
        assert store.peek(lambda db: book.balance(db, "user:1")) == (6_000, 0)
        with pytest.raises(sqlite3.OperationalError):
            store.peek(lambda db: db.execute("SELECT * FROM no_such_table").fetchone())
        assert store.peek(lambda db: book.balance(db, "user:1")) == (6_000, 0)  # still usable
    finally:
        store.close()
