"""Automatic provider payouts to Lightning Addresses.

Invariants:
- a provider is paid only its *payable* earnings (earnings in probation excluded), in
  whole sats; the msat remainder stays as earnings;
- the payout is recorded as pending, and its amount moved out of the provider's
  earnings into ``payouts:in_flight``, in one transaction *before* the backend is asked
  to pay; so a crash at any point can neither lose the money nor pay it twice;
- a node with a payout still pending gets no new one: an ambiguous outcome holds the
  funds until the backend says, by payment hash, that it was paid (then it is done) or
  that it definitely failed (then the funds return to the provider);
- the routing fee is the operator's cost, posted to ``operator:routing_fees`` (so
  that ``operator:fee`` holds only the 5% shares);
- one provider's failure is that payout's failure, never the worker's: whatever goes
  wrong for one payout (an address that does not resolve, a hostile LNURL server, an
  unexpected error anywhere) is recorded in ``payout_holds`` with its reason, counted
  in ``/metrics``, retried with exponential backoff, and the worker goes on with the
  others. Nothing a stored row holds can stop the worker or the process.
"""

from __future__ import annotations

import logging

import attrs
import bolt11
import trio

from ledger import book
from ledger.store import Connection, Storage
from routecat.clock import Clock
from routecat.config import Config
from routecat.db import cluster as cluster_db
from routecat.db import nodes
from routecat.db import payouts as stored
from routecat.db.payouts import PayoutHold, PayoutRecord
from routecat.metrics import Metrics
from routecat.money.lightning.backend import Backend, Payment
from routecat.money.lightning.errors import InvoiceRejected, LightningError, LnurlError
from routecat.money.lightning.lnurl import Resolver

log = logging.getLogger("routecat.money.lightning.payouts")

RETRY_FIRST = 60.0
RETRY_MAX = 6 * 3600.0
# One payout worker at a time across replicas: the holder of this lease.
LEASE = "payouts"
LEASE_SLACK = 120.0  # a cycle (LNURL round trips, payments) fits well within the lease


def fee_cap_msat(amount_msat: int) -> int:
    return max(10_000, amount_msat // 100)


def payable_msat(db: Connection, node_id: str, now: float) -> int:
    account = book.provider_account(node_id)
    balance, _ = book.balance(db, account)
    return max(0, balance - book.held(db, account, now))


@attrs.frozen
class Due:
    node_id: str
    address: str
    amount_msat: int


def start_payout(db: Connection, due: Due, payment_hash: str, pr: str, now: float) -> int | None:
    """Record the payout and move its amount in flight; None if it no longer fits."""
    if payable_msat(db, due.node_id, now) < due.amount_msat:
        return None
    if stored.has_pending(db, due.node_id):
        return None
    payout_id = stored.insert_pending(
        db, due.node_id, due.address, due.amount_msat, payment_hash, pr, now
    )
    book.post(
        db,
        f"payout:{payout_id}:start",
        "payout",
        [
            book.Posting(book.provider_account(due.node_id), -due.amount_msat),
            book.Posting(book.PAYOUTS_IN_FLIGHT, due.amount_msat),
        ],
        memo=f"payout {payout_id} to {due.address}",
    )
    return payout_id


def finish_payout(db: Connection, payout_id: int, payment: Payment, now: float) -> str:
    """Settle a pending payout on a definite answer; idempotent."""
    found = stored.payout(db, payout_id)
    if found is None or found.state != "pending":
        return "unchanged"
    amount = found.amount_msat
    if payment.state == "paid":
        fee = max(0, payment.fee_msat)
        book.post(
            db,
            f"payout:{payout_id}:done",
            "payout",
            [
                book.Posting(book.PAYOUTS_IN_FLIGHT, -amount),
                book.Posting(book.LIGHTNING_OUT, amount + fee),
                book.Posting(book.ROUTING_FEES, -fee),
            ],
            memo=f"payout {payout_id} paid, routing fee {fee} msat",
        )
        stored.mark_paid(db, payout_id, fee, now)
        stored.clear_hold(db, found.node_id)  # however it was learned (at once or reconciled)
        return "paid"
    if payment.state == "failed":
        book.post(
            db,
            f"payout:{payout_id}:fail",
            "payout",
            [
                book.Posting(book.PAYOUTS_IN_FLIGHT, -amount),
                book.Posting(book.provider_account(found.node_id), amount),
            ],
            memo=f"payout {payout_id} failed: {payment.reason[:100]}",
        )
        stored.mark_failed(db, payout_id, payment.reason[:300], now)
        return "failed"
    return "unchanged"


def hold_payout(db: Connection, node_id: str, reason: str, now: float) -> float:
    """Record why a provider's payout is held; returns when it will be tried again."""
    earlier = stored.hold(db, node_id)
    failures = 1 + (earlier.failures if earlier else 0)
    retry_at: float = now + min(RETRY_MAX, RETRY_FIRST * 2.0 ** min(failures - 1, 20))
    stored.put_hold(db, PayoutHold(node_id, reason[:300], failures, retry_at, now))
    return retry_at


def describe_error(exc: BaseException) -> str:
    """A reason fit for a log line and the operator's list: never a traceback or a secret."""
    text = str(exc)[:200] if isinstance(exc, LnurlError | LightningError | InvoiceRejected) else ""
    return f"{type(exc).__name__}: {text}" if text else f"unexpected {type(exc).__name__}"


@attrs.define(eq=False)
class Payouts:
    store: Storage
    config: Config
    backend: Backend
    resolver: Resolver
    metrics: Metrics
    clock: Clock
    holder: str = "gateway"  # this replica's id: one payout worker at a time holds the lease
    paid: int = 0

    def lease_ttl(self) -> float:
        return 2 * self.config.payout_interval + LEASE_SLACK

    async def lease(self) -> bool:
        """Take or renew the payout worker's lease; False while another replica holds it."""
        now, ttl = self.clock.wall(), self.lease_ttl()
        return await self.store.write(
            lambda db: cluster_db.take_lease(db, LEASE, self.holder, now, ttl)
        )

    async def due(self) -> list[Due]:
        now = self.clock.wall()

        def read(db: Connection) -> list[Due]:
            out = []
            for node in nodes.payout_targets(db):
                threshold = self.config.payout_threshold(node.payout_threshold_sats)
                payable = payable_msat(db, node.id, now)
                amount = payable // 1000 * 1000
                if amount < threshold * 1000 or stored.has_pending(db, node.id):
                    continue
                held = stored.hold(db, node.id)
                if held is not None and held.next_attempt_at > now:
                    continue
                out.append(Due(node.id, node.payout_address, amount))
            return out

        return await self.store.read(read)

    async def reconcile(self) -> None:
        """Ask the backend about every pending payout, by payment hash."""
        for pending in await self.store.read(stored.pending):
            payout_id = pending.id
            try:
                if pending.payment_hash is None:
                    raise LightningError("a pending payout without a payment hash")
                payment = await self.backend.payment_status(pending.payment_hash)
                if payment.state != "pending":
                    await self._finish(payout_id, payment)
            except Exception as exc:  # one payout's trouble, never the worker's
                self.metrics.payout_failures.labels("reconcile").inc()
                log.warning(
                    "payout %d: no answer from the backend (%s); funds held",
                    payout_id,
                    describe_error(exc),
                )

    async def _finish(self, payout_id: int, payment: Payment) -> None:
        now = self.clock.wall()
        if not isinstance(payment.fee_msat, int) or not 0 <= payment.fee_msat <= 10**12:
            payment = attrs.evolve(payment, fee_msat=0)  # a backend's nonsense fee: not booked
        outcome = await self.store.write(lambda db: finish_payout(db, payout_id, payment, now))
        if outcome == "paid":
            self.paid += 1
            log.info("payout %d paid (routing fee %d msat)", payout_id, payment.fee_msat)
        elif outcome == "failed":
            log.warning(
                "payout %d failed: %s; funds returned to the provider", payout_id, payment.reason
            )

    async def _hold(self, due: Due, stage: str, reason: str) -> None:
        now = self.clock.wall()
        self.metrics.payout_failures.labels(stage).inc()
        retry_at = await self.store.write(lambda db: hold_payout(db, due.node_id, reason, now))
        log.warning(
            "payout to node %s held (%s): %s; next try in %.0fs",
            due.node_id,
            stage,
            reason,
            retry_at - now,
        )

    async def pay(self, due: Due) -> str:
        """Resolve, record, pay, settle one payout. Returns its state; never raises for
        anything about this payout (it is held, with its reason, and retried later)."""
        try:
            pr = await self.resolver.fetch_invoice(
                due.address, due.amount_msat, self.backend.network
            )
            payment_hash = str(bolt11.decode(pr).payment_hash)
        except Exception as exc:
            await self._hold(due, "resolve", describe_error(exc))
            return "unresolved"
        now = self.clock.wall()
        payout_id = await self.store.write(lambda db: start_payout(db, due, payment_hash, pr, now))
        if payout_id is None:
            return "skipped"
        log.info("payout %d: paying %d sats to %s", payout_id, due.amount_msat // 1000, due.address)
        try:
            payment = await self.backend.pay_invoice(pr, fee_cap_msat(due.amount_msat))
        except InvoiceRejected as exc:
            payment = Payment("failed", payment_hash, reason=str(exc))
        except Exception as exc:
            # Perhaps paid, perhaps not: the funds stay in flight until the backend says.
            self.metrics.payout_failures.labels("pay").inc()
            log.warning(
                "payout %d: outcome unknown (%s); funds held until reconciled",
                payout_id,
                describe_error(exc),
            )
            return "pending"
        if payment.state == "pending":
            return "pending"
        await self._finish(payout_id, payment)
        if payment.state == "paid":
            cap = fee_cap_msat(due.amount_msat)
            if payment.fee_msat > cap:
                # LNbits and phoenixd take no per-payment fee limit (docs/lightning.md):
                # the fee actually paid is checked here, and an excess is flagged.
                self.metrics.payout_failures.labels("fee_over_cap").inc()
                log.error(
                    "payout %d: routing fee %d msat exceeded the cap of %d msat (%s)",
                    payout_id,
                    payment.fee_msat,
                    cap,
                    self.backend.name,
                )
        else:
            await self._hold(due, "pay", f"payment failed: {payment.reason[:200]}")
        return payment.state

    async def cycle(self) -> None:
        await self.reconcile()
        due = await self.due()
        if not due:
            self.metrics.wallet_shortfall.set(0)
            return
        try:
            available = await self.backend.balance_msat()
            if isinstance(available, bool) or not isinstance(available, int):
                raise LightningError(f"the wallet balance is not an integer: {available!r:.40}")
        except Exception as exc:
            log.warning("cannot read the wallet balance (%s); payouts wait", describe_error(exc))
            return
        needed = sum(d.amount_msat + fee_cap_msat(d.amount_msat) for d in due)
        self.metrics.wallet_shortfall.set(max(0, needed - available))
        if needed > available:
            log.warning(
                "the Lightning wallet holds %d sats but due payouts need up to %d sats:"
                " payouts that do not fit wait",
                available // 1000,
                needed // 1000,
            )
        for d in due:
            cost = d.amount_msat + fee_cap_msat(d.amount_msat)
            if cost > available:
                continue
            if not await self.lease():  # lost to another replica: it carries on
                return
            if await self.pay(d) in ("paid", "pending"):
                available -= cost

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            await self._work()
        finally:
            with trio.move_on_after(5, shield=True):
                try:
                    await self.store.write(lambda db: cluster_db.drop_lease(db, LEASE, self.holder))
                except Exception as exc:
                    log.warning("payout lease not released (%r); it expires", exc)

    async def _work(self) -> None:
        while True:
            try:
                if await self.lease():
                    await self.cycle()
            except Exception as exc:  # e.g. the database briefly unavailable: try again later
                self.metrics.payout_failures.labels("cycle").inc()
                log.error("payout cycle interrupted: %s", describe_error(exc), exc_info=exc)
            await trio.sleep(self.config.payout_interval)

    async def holds(self) -> list[PayoutHold]:
        return await self.store.read(stored.holds)

    async def list(self) -> list[PayoutRecord]:
        return await self.store.read(stored.recent)
