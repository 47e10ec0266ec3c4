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
- the routing fee is the operator's cost (paid from ``operator:fee``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import bolt11
import httpx
import sqlite_utils
import trio

from ledger import book
from ledger.store import Store, one, rows
from routecat.config import Config
from routecat.lightning.backend import Backend, InvoiceRejected, LightningError, Payment
from routecat.lightning.lnurl import LnurlError, Resolver
from routecat.metrics import Metrics

log = logging.getLogger("routecat.lightning.payouts")

RETRY_AFTER_FAILURE = 600.0


def fee_cap_msat(amount_msat: int) -> int:
    return max(10_000, amount_msat // 100)


def payable_msat(db: sqlite_utils.Database, node_id: str, now: float) -> int:
    account = book.provider_account(node_id)
    balance, _ = book.balance(db, account)
    return max(0, balance - book.held(db, account, now))


@attrs.frozen
class Due:
    node_id: str
    address: str
    amount_msat: int


def start_payout(
    db: sqlite_utils.Database, due: Due, payment_hash: str, pr: str, now: float
) -> int | None:
    """Record the payout and move its amount in flight; None if it no longer fits."""
    if payable_msat(db, due.node_id, now) < due.amount_msat:
        return None
    if one(db, "SELECT 1 FROM payouts WHERE node_id = ? AND state = 'pending'", (due.node_id,)):
        return None
    cursor = db.conn.execute(
        "INSERT INTO payouts (node_id, address, amount_msat, payment_hash, bolt11, state,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (due.node_id, due.address, due.amount_msat, payment_hash, pr, now, now),
    )
    payout_id = cursor.lastrowid
    assert payout_id is not None
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


def finish_payout(db: sqlite_utils.Database, payout_id: int, payment: Payment, now: float) -> str:
    """Settle a pending payout on a definite answer; idempotent."""
    row = one(db, "SELECT node_id, amount_msat, state FROM payouts WHERE id = ?", (payout_id,))
    if row is None or row["state"] != "pending":
        return "unchanged"
    amount = int(row["amount_msat"])
    if payment.state == "paid":
        fee = max(0, payment.fee_msat)
        book.post(
            db,
            f"payout:{payout_id}:done",
            "payout",
            [
                book.Posting(book.PAYOUTS_IN_FLIGHT, -amount),
                book.Posting(book.LIGHTNING_OUT, amount + fee),
                book.Posting(book.OPERATOR_FEE, -fee),
            ],
            memo=f"payout {payout_id} paid, routing fee {fee} msat",
        )
        db.conn.execute(
            "UPDATE payouts SET state = 'paid', fee_msat = ?, updated_at = ? WHERE id = ?",
            (fee, now, payout_id),
        )
        return "paid"
    if payment.state == "failed":
        book.post(
            db,
            f"payout:{payout_id}:fail",
            "payout",
            [
                book.Posting(book.PAYOUTS_IN_FLIGHT, -amount),
                book.Posting(book.provider_account(row["node_id"]), amount),
            ],
            memo=f"payout {payout_id} failed: {payment.reason[:100]}",
        )
        db.conn.execute(
            "UPDATE payouts SET state = 'failed', reason = ?, updated_at = ? WHERE id = ?",
            (payment.reason[:300], now, payout_id),
        )
        return "failed"
    return "unchanged"


@attrs.define(eq=False)
class Payouts:
    store: Store
    config: Config
    backend: Backend
    resolver: Resolver
    metrics: Metrics
    wall: Callable[[], float] = time.time
    _backoff: dict[str, float] = attrs.Factory(dict)
    paid: int = 0

    async def due(self) -> list[Due]:
        now = self.wall()

        def read(db: sqlite_utils.Database) -> list[Due]:
            out = []
            for node in rows(
                db,
                "SELECT id, payout_address, payout_threshold_sats FROM nodes"
                " WHERE payout_address != '' AND banned_at IS NULL",
            ):
                threshold = node["payout_threshold_sats"] or self.config.payout_threshold_sats
                threshold = min(
                    max(threshold, self.config.payout_min_threshold_sats),
                    self.config.payout_max_threshold_sats,
                )
                payable = payable_msat(db, node["id"], now)
                amount = payable // 1000 * 1000
                if amount >= threshold * 1000 and not one(
                    db,
                    "SELECT 1 FROM payouts WHERE node_id = ? AND state = 'pending'",
                    (node["id"],),
                ):
                    out.append(Due(node["id"], node["payout_address"], amount))
            return out

        return [d for d in await self.store.read(read) if self._backoff.get(d.node_id, 0) <= now]

    async def reconcile(self) -> None:
        """Ask the backend about every pending payout, by payment hash."""
        pending = await self.store.read(
            lambda db: [
                (r["id"], r["payment_hash"])
                for r in rows(db, "SELECT id, payment_hash FROM payouts WHERE state = 'pending'")
            ]
        )
        for payout_id, payment_hash in pending:
            try:
                payment = await self.backend.payment_status(payment_hash)
            except (LightningError, httpx.HTTPError, OSError) as exc:
                log.warning(
                    "payout %d: no answer from the backend (%s); funds held", payout_id, exc
                )
                continue
            await self._finish(payout_id, payment)

    async def _finish(self, payout_id: int, payment: Payment) -> None:
        now = self.wall()
        outcome = await self.store.write(lambda db: finish_payout(db, payout_id, payment, now))
        if outcome == "paid":
            self.paid += 1
            log.info("payout %d paid (routing fee %d msat)", payout_id, payment.fee_msat)
        elif outcome == "failed":
            log.warning(
                "payout %d failed: %s; funds returned to the provider", payout_id, payment.reason
            )

    async def pay(self, due: Due) -> str:
        """Resolve, record, pay, settle one payout. Returns its state."""
        try:
            pr = await self.resolver.fetch_invoice(
                due.address, due.amount_msat, self.backend.network
            )
        except LnurlError as exc:
            self._backoff[due.node_id] = self.wall() + RETRY_AFTER_FAILURE
            log.warning(
                "payout to node %s (%s) not sent, funds held: %s", due.node_id, due.address, exc
            )
            return "unresolved"
        payment_hash = str(bolt11.decode(pr).payment_hash)
        now = self.wall()
        payout_id = await self.store.write(lambda db: start_payout(db, due, payment_hash, pr, now))
        if payout_id is None:
            return "skipped"
        log.info("payout %d: paying %d sats to %s", payout_id, due.amount_msat // 1000, due.address)
        try:
            payment = await self.backend.pay_invoice(pr, fee_cap_msat(due.amount_msat))
        except InvoiceRejected as exc:
            payment = Payment("failed", payment_hash, reason=str(exc))
        except (LightningError, httpx.HTTPError, OSError, trio.TooSlowError) as exc:
            log.warning(
                "payout %d: outcome unknown (%s); funds held until reconciled", payout_id, exc
            )
            return "pending"
        await self._finish(payout_id, payment)
        return payment.state

    async def cycle(self) -> None:
        await self.reconcile()
        due = await self.due()
        if not due:
            self.metrics.wallet_shortfall.set(0)
            return
        try:
            available = await self.backend.balance_msat()
        except (LightningError, httpx.HTTPError, OSError) as exc:
            log.warning("cannot read the wallet balance (%s); payouts wait", exc)
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
            if await self.pay(d) in ("paid", "pending"):
                available -= cost

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.cycle()
            except (LightningError, httpx.HTTPError, OSError) as exc:
                log.warning("payout cycle interrupted: %s", exc)
            await trio.sleep(self.config.payout_interval)

    async def list(self) -> list[dict[str, Any]]:
        return await self.store.read(
            lambda db: [
                dict(r) for r in rows(db, "SELECT * FROM payouts ORDER BY id DESC LIMIT 200")
            ]
        )
