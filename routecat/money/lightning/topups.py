"""Top-ups: a BOLT11 invoice per request, credited exactly once per payment hash.

Invariants:
- the invoice is stored (``topups``) before it is returned to the user;
- a credit is the ledger transaction ``topup:<payment_hash>`` (user +amount,
  ``lightning:in`` -amount): idempotent, so a payment seen by poll, webhook and the
  reconciler after a restart is credited once;
- whatever the backend says was paid is credited, even past our expiry time; an
  invoice becomes ``expired`` only when it was never paid and the backend confirms it
  can no longer be;
- a webhook is only a hint: the backend is asked before anything is credited.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio

from ledger import book
from ledger.store import Connection, Storage
from routecat.clock import Clock, rfc3339
from routecat.config import Config
from routecat.db import topups as stored
from routecat.errors import InvalidRequest, NotFound, ServiceUnavailable
from routecat.money.lightning.backend import Backend
from routecat.money.lightning.errors import LightningError

log = logging.getLogger("routecat.money.lightning.topups")

# After expiry, keep asking the backend this long before accepting "expired".
EXPIRED_GRACE = 120.0
# Expired top-ups are asked about again, less often, for this long after expiry.
LATE_WINDOW = 7 * 86400.0
LATE_INTERVAL = 60.0


def credit_topup(db: Connection, payment_hash: str, now: float) -> bool:
    """Credit a paid top-up once; True if this call credited it."""
    found = stored.topup(db, payment_hash)
    if found is None:
        return False
    amount = found.amount_msat
    tx = book.post(
        db,
        f"topup:{payment_hash}",
        "topup",
        [
            book.Posting(book.user_account(found.key_id), amount),
            book.Posting(book.LIGHTNING_IN, -amount),
        ],
        memo=f"top-up {amount // 1000} sats",
    )
    stored.mark_paid(db, payment_hash, now)
    return tx is not None


@attrs.define(eq=False)
class Topups:
    store: Storage
    config: Config
    backend: Backend
    clock: Clock
    poll_interval: float = 2.0
    credited: int = 0
    _wake: trio.Event = attrs.Factory(trio.Event)

    async def create(self, key_id: int, amount_sats: int) -> dict[str, Any]:
        low, high = self.config.topup_min_sats, self.config.topup_max_sats
        if not low <= amount_sats <= high:
            raise InvalidRequest(
                f"invalid value for 'amount_sats': from {low} to {high} sats", param="amount_sats"
            )
        try:
            invoice = await self.backend.create_invoice(
                amount_sats * 1000,
                f"RouteCat top-up of {amount_sats} sats",
                self.config.invoice_expiry,
            )
            if invoice.amount_msat != amount_sats * 1000 or not invoice.bolt11:
                raise LightningError("the backend's invoice is not for the amount asked")
        except Exception as exc:
            detail = str(exc)[:200] if isinstance(exc, LightningError) else type(exc).__name__
            log.warning("top-up invoice not created: %s", detail)
            raise ServiceUnavailable(
                "the Lightning backend could not create an invoice; try again shortly",
                retry_after=10,
            ) from None
        now = self.clock.wall()

        record = stored.Topup(
            payment_hash=invoice.payment_hash,
            key_id=key_id,
            amount_msat=invoice.amount_msat,
            bolt11=invoice.bolt11,
            backend=self.backend.name,
            state="pending",
            created_at=now,
            expires_at=invoice.expires_at,
        )
        await self.store.write(lambda db: stored.insert_topup(db, record))
        self.wake()
        log.info("top-up invoice %s for %d sats", invoice.payment_hash[:16], amount_sats)
        return {
            "invoice": invoice.bolt11,
            "payment_hash": invoice.payment_hash,
            "amount_sats": amount_sats,
            "expires_at": rfc3339(invoice.expires_at),
        }

    async def status(self, key_id: int, payment_hash: str) -> dict[str, Any]:
        found = await self.store.read(lambda db: stored.topup(db, payment_hash))
        if found is None or found.key_id != key_id:
            # Someone else's invoice or no invoice at all: the same answer.
            raise NotFound("no such top-up for this key", code="not_found", param="payment_hash")
        if found.state != "paid":  # "expired" is never final: a late payment counts
            await self.check(payment_hash)
            found = await self.store.read(lambda db: stored.topup(db, payment_hash))
            assert found is not None
        return {
            "payment_hash": payment_hash,
            "status": found.state,
            "amount_sats": found.amount_msat // 1000,
            "invoice": found.bolt11,
            "expires_at": rfc3339(found.expires_at),
            "paid_at": rfc3339(found.paid_at) if found.paid_at else None,
        }

    async def exists(self, payment_hash: str) -> bool:
        return await self.store.read(lambda db: stored.topup(db, payment_hash)) is not None

    def wake(self) -> None:
        self._wake.set()

    async def check(self, payment_hash: str) -> str:
        """Ask the backend about one top-up and act on a definite answer."""
        try:
            status = await self.backend.invoice_status(payment_hash)
        except Exception as exc:  # anything but a definite answer: still pending
            detail = str(exc)[:200] if isinstance(exc, LightningError) else type(exc).__name__
            log.warning(
                "top-up %s: backend gave no answer (%s); still pending", payment_hash[:16], detail
            )
            return "pending"
        now = self.clock.wall()
        if status.state == "paid":
            if await self.store.write(lambda db: credit_topup(db, payment_hash, now)):
                self.credited += 1
                log.info("top-up %s paid and credited", payment_hash[:16])
            return "paid"
        found = await self.store.read(lambda db: stored.topup(db, payment_hash))
        # Expired only when the backend says it can no longer be paid, or, for a backend
        # that cannot say, once expiry plus a grace period has passed and this status
        # check still says unpaid. Never final for crediting: see ``reconcile``.
        if found is not None and (
            status.state == "expired" or now >= found.expires_at + EXPIRED_GRACE
        ):
            await self.store.write(lambda db: stored.mark_expired(db, payment_hash))
            return "expired"
        return "pending"

    async def reconcile(self, *, expired_too: bool = False) -> int:
        """Check every pending top-up (also those past expiry: paid late is still paid),
        and with ``expired_too`` those that expired in the last ``LATE_WINDOW`` seconds,
        so that a payment the backend reports late is still credited, once."""
        since = self.clock.wall() - LATE_WINDOW if expired_too else None
        paid = 0
        for payment_hash in await self.store.read(lambda db: stored.unsettled(db, since)):
            if await self.check(payment_hash) == "paid":
                paid += 1
        return paid

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The reconciler: at start (payments made while we were down), then every few
        seconds while invoices are pending."""
        await self._reconcile_safely(expired_too=True)
        task_status.started()
        last_late_check = self.clock.wall()
        while True:
            with trio.move_on_after(self.poll_interval):
                await self._wake.wait()
            self._wake = trio.Event()
            late = self.clock.wall() - last_late_check >= LATE_INTERVAL
            if late:
                last_late_check = self.clock.wall()
            await self._reconcile_safely(expired_too=late)

    async def _reconcile_safely(self, *, expired_too: bool) -> None:
        try:
            await self.reconcile(expired_too=expired_too)
        except Exception as exc:  # e.g. the database briefly unavailable: next round
            log.error("top-up reconciliation interrupted: %r", exc, exc_info=exc)
