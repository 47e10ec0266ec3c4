"""Admission: what a request may cost before it runs, reserved before it starts.

Invariants: a free request takes one of the key's daily free requests and reserves
its maximum cost against the daily subsidy budget; a paid request is admitted only if
``balance - reserved > 0`` (checked and reserved atomically) and reserves its
estimated maximum cost. Nothing is admitted without a BTC/USD rate (never priced at
0). Every admission this process holds open is in ``open_reservations`` until its job
settles (the sweeper leaves those alone).

Where paid reservations live: with replicas (PostgreSQL) in the database, in one
transaction with the check, so that every replica sees them. With one process
(SQLite) in this process's memory (``local``): the balance is read on the event loop
(``Store.peek``, microseconds, no await) and the reservation added before anything
else runs, so the check and the reservation are atomic; the reservation is dropped
only after its settlement committed, so a cost is always counted by the balance, by a
reservation, or by both (never by neither). A reservation is not money (no posting
exists for it), so a crash that loses them loses no bill and doubles none: see
``docs/billing.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import attrs
import trio

from ledger import book
from ledger.money import cost_msat
from ledger.store import Connection, Storage
from routecat.clock import Clock, utc_day
from routecat.config import Config
from routecat.db import quota
from routecat.errors import InsufficientBalance, ServiceUnavailable
from routecat.money.pricing import Catalog, Price
from routecat.money.rates import RateFeed
from routecat.network.jobs import JobSpec

PEEK_ATTEMPTS = 5


@attrs.frozen
class Admission:
    free: bool
    rate: Decimal
    price: Price
    reserved_msat: int
    day: str


@attrs.define(eq=False)
class Admissions:
    store: Storage
    config: Config
    catalog: Catalog
    rates: RateFeed
    clock: Clock
    # Jobs admitted by this process whose reservation is still open (queued, running or
    # settling): the sweeper never releases these.
    open_reservations: set[str] = attrs.Factory(set)
    holder: str = ""  # this replica's id, written on its reservations
    # One process (SQLite): a read on the event loop (``Store.peek``); paid
    # reservations then live in memory (see the module doc).
    peek: Callable[[Callable[[Connection], Any]], Any] | None = None
    # Paid reservations held in memory: per account, and per job (account, amount).
    _held: dict[str, int] = attrs.Factory(dict)
    _holds: dict[str, tuple[str, int]] = attrs.Factory(dict)

    def max_cost(self, spec: JobSpec, price: Price, rate: Decimal) -> int:
        return cost_msat(
            spec.prompt_bound,
            spec.max_tokens + 1,
            price.input_usd_per_1m,
            price.output_usd_per_1m,
            rate,
        )

    def ceiling(self, model: str, advertised: int | None) -> int | None:
        """The most a request for ``model`` may ask for: the catalog's
        ``max_output_tokens``, else what its nodes advertise (their context length)."""
        return self.catalog.price(model).max_output_tokens or advertised

    def applied_max_tokens(
        self, model: str, requested: int | None, advertised: int | None = None
    ) -> int:
        """A request's ``max_tokens``: what it asked for, up to the model's ceiling; when
        it asks nothing, the default (the catalog's, else ``default_max_tokens``), which
        also sizes the reservation. Raising a ceiling never makes reservations larger."""
        ceiling = self.ceiling(model, advertised)
        default = self.catalog.price(model).max_tokens or self.config.default_max_tokens
        wanted = default if requested is None else requested
        return min(wanted, ceiling) if ceiling else wanted

    async def admit(self, spec: JobSpec) -> JobSpec:
        price = self.catalog.price(spec.model)
        now = self.clock.wall()
        day = utc_day(now)
        last = self.rates.last_rate()
        if last is None:
            raise ServiceUnavailable(
                "no BTC/USD rate is known yet: requests cannot be priced",
                code="pricing_unavailable",
                retry_after=30,
            )
        free_spec = spec
        if spec.max_tokens > self.config.free_max_tokens:
            # A free request's max_tokens is capped at the free cap (clients such as
            # OpenCode always ask for a large one); the response says it was free.
            limit = self.config.free_max_tokens
            free_spec = attrs.evolve(
                spec, max_tokens=limit, request={**spec.request, "max_tokens": limit}
            )
        why_not_free = "the model is not in this gateway's free catalog"
        if self.catalog.listed(spec.model):
            reserve = self.max_cost(free_spec, price, last)
            budget = self.config.free_daily_budget_sats * 1000

            def take_free(db: Connection) -> str | None:
                if quota.free_used(db, spec.key_id, day) >= self.config.free_daily_requests:
                    return (
                        f"the key's {self.config.free_daily_requests} free requests for today"
                        " are used (they reset at midnight UTC)"
                    )
                _, reserved = book.balance(db, book.SUBSIDY)
                if quota.subsidy_spent(db, day) + reserved + reserve > budget:
                    return "the gateway's free budget for today is spent"
                quota.take_free_request(db, spec.key_id, day, spec.job_id)
                book.reserve_unconditionally(
                    db, spec.job_id, book.SUBSIDY, reserve, now, self.holder
                )
                return None

            refused = await self.store.write(take_free)
            if refused is None:
                self.open_reservations.add(spec.job_id)
                return attrs.evolve(free_spec, admission=Admission(True, last, price, reserve, day))
            why_not_free = refused
        rate = self.rates.fresh_rate()
        if rate is None:
            raise ServiceUnavailable(
                "the BTC/USD rate is too old to price a paid request",
                code="pricing_unavailable",
                retry_after=60,
            )
        reserve = self.max_cost(spec, price, rate)
        account = book.user_account(spec.key_id)
        if self.peek is not None:
            admitted = await self._reserve_locally(spec.job_id, account, reserve)
        else:
            admitted = await self.store.write(
                lambda db: book.reserve(db, spec.job_id, account, reserve, now, self.holder)
            )
        if admitted:
            self.open_reservations.add(spec.job_id)
        else:
            raise InsufficientBalance(
                f"insufficient balance, and this request cannot be free: {why_not_free};"
                " top up with POST /v1/auth/topup"
            )
        return attrs.evolve(spec, admission=Admission(False, rate, price, reserve, day))

    async def _reserve_locally(self, job_id: str, account: str, amount: int) -> bool:
        """Check ``balance - reserved > 0`` and reserve ``amount`` in memory, with no
        await between the read and the reservation."""
        peek = self.peek
        assert peek is not None, "local reservations need a store that peeks"
        for attempt in range(PEEK_ATTEMPTS):
            try:
                balance, reserved = peek(lambda db: book.balance(db, account))
                break
            except Exception as exc:  # SQLITE_BUSY during a WAL reset: rare and brief
                if attempt == PEEK_ATTEMPTS - 1:
                    raise ServiceUnavailable(
                        "the ledger is busy; retry in a second", retry_after=1
                    ) from exc
                await trio.sleep(0.001 * (attempt + 1))
        # No await from the read to here: no other admission saw this balance meanwhile.
        if balance - reserved - self._held.get(account, 0) <= 0:
            return False
        self._held[account] = self._held.get(account, 0) + amount
        self._holds[job_id] = (account, amount)
        return True

    def settled(self, job_id: str) -> None:
        """The job's settlement committed (or it never started): its reservation ends."""
        self.open_reservations.discard(job_id)
        held = self._holds.pop(job_id, None)
        if held is not None:
            account, amount = held
            left = self._held[account] - amount
            if left:
                self._held[account] = left
            else:
                del self._held[account]

    def held(self, account: str) -> int:
        """What this process holds in memory against ``account`` (paid reservations)."""
        return self._held.get(account, 0)

    async def release(self, spec: JobSpec) -> None:
        """Undo an admission whose job never started (no node, shutting down)."""
        admission = spec.admission
        if not isinstance(admission, Admission):
            return
        if spec.job_id in self._holds:
            self.settled(spec.job_id)  # held in memory: nothing was written
            return

        def undo(db: Connection) -> None:
            book.release(db, spec.job_id)
            quota.settle_claim(db, spec.job_id, give_back=True)

        await self.store.write(undo)
        self.settled(spec.job_id)

    async def balance(self, key_id: int) -> dict[str, int]:
        day = utc_day(self.clock.wall())

        def read(db: Connection) -> tuple[int, int]:
            balance, _ = book.balance(db, book.user_account(key_id))
            return balance, quota.free_used(db, key_id, day)

        balance_msat, used = await self.store.read(read)
        return {
            "balance_sats": balance_msat // 1000,
            "balance_msat": balance_msat,
            "free_remaining": max(0, self.config.free_daily_requests - used),
        }
