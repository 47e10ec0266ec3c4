"""The dev wallet: the embedded default, a Lightning wallet simulated inside the gateway.

It issues real, signed regtest BOLT11 invoices (``lnbcrt...``, bolt11 + coincurve)
that any decoder accepts, records them in the gateway's database, and settles its own
invoices when told to (``routecat wallet pay``), so a self-hoster can try the whole
top-up flow offline. Its balance is what its invoices received minus what it paid.
Paying an invoice of another wallet is *simulated*: the payment is recorded as
successful without any network (there is none on regtest-in-a-box). The signing key
lives only in memory: it is worthless and is never stored.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

import attrs
import bolt11
import sqlite_utils
from bolt11.models.tags import TagChar, Tags
from coincurve import PrivateKey

from ledger.store import Store, one
from routecat.lightning.backend import (
    Invoice,
    InvoiceRejected,
    InvoiceStatus,
    LightningError,
    Payment,
    check_invoice,
)


@attrs.define(eq=False)
class DevWallet:
    store: Store
    wall: Callable[[], float] = time.time
    name: str = "dev"
    network: str = "regtest"
    _key: PrivateKey = attrs.Factory(PrivateKey)

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice:
        now = self.wall()
        preimage = secrets.token_bytes(32)
        payment_hash = hashlib.sha256(preimage).hexdigest()
        tags = Tags()
        tags.add(TagChar.payment_hash, payment_hash)
        tags.add(TagChar.payment_secret, secrets.token_hex(32))
        tags.add(TagChar.description, memo)
        tags.add(TagChar.expire_time, expiry)
        invoice = bolt11.Bolt11(
            currency="bcrt",
            date=int(now),
            tags=tags,
            amount_msat=bolt11.MilliSatoshi(amount_msat),
        )
        pr = bolt11.encode(invoice, self._key.secret.hex())
        expires_at = int(now) + expiry

        def write(db: sqlite_utils.Database) -> None:
            db.conn.execute(
                "INSERT INTO devwallet_invoices (payment_hash, bolt11, amount_msat, memo,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (payment_hash, pr, amount_msat, memo, now, expires_at),
            )

        await self.store.write(write)
        return Invoice(payment_hash, pr, amount_msat, expires_at)

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus:
        row = await self.store.read(
            lambda db: one(
                db,
                "SELECT amount_msat, expires_at, paid_at FROM devwallet_invoices"
                " WHERE payment_hash = ?",
                (payment_hash,),
            )
        )
        if row is None:
            raise LightningError(f"the dev wallet has no invoice {payment_hash}")
        if row["paid_at"] is not None:
            return InvoiceStatus("paid", int(row["amount_msat"]))
        if row["expires_at"] <= self.wall():
            return InvoiceStatus("expired")
        return InvoiceStatus("pending")

    async def settle_own(self, pr: str) -> str:
        """Pay one of our own invoices, as an outside payer would (``routecat wallet pay``)."""
        try:
            decoded = bolt11.decode(pr)
        except Exception:  # any decoding failure
            raise InvoiceRejected("not a valid BOLT11 invoice") from None
        now = self.wall()

        def write(db: sqlite_utils.Database) -> str:
            row = one(
                db,
                "SELECT amount_msat, expires_at, paid_at FROM devwallet_invoices"
                " WHERE payment_hash = ?",
                (decoded.payment_hash,),
            )
            if row is None:
                raise InvoiceRejected("this invoice was not issued by this gateway's dev wallet")
            if row["paid_at"] is not None:
                raise InvoiceRejected("this invoice is already paid")
            if row["expires_at"] <= now:
                raise InvoiceRejected("this invoice has expired")
            db.conn.execute(
                "UPDATE devwallet_invoices SET paid_at = ? WHERE payment_hash = ?",
                (now, decoded.payment_hash),
            )
            return str(decoded.payment_hash)

        return await self.store.write(write)

    async def pay_invoice(self, pr: str, max_fee_msat: int) -> Payment:
        decoded = check_invoice(pr, _amount(pr), self.network, self.wall())
        amount = int(decoded.amount_msat or 0)
        balance = await self.balance_msat()
        payment_hash = str(decoded.payment_hash)
        if amount > balance:
            return Payment("failed", payment_hash, reason="insufficient balance in the dev wallet")
        now = self.wall()

        def write(db: sqlite_utils.Database) -> Payment:
            existing = one(
                db, "SELECT state FROM devwallet_payments WHERE payment_hash = ?", (payment_hash,)
            )
            if existing is not None:
                return Payment("failed", payment_hash, reason="invoice already paid")
            db.conn.execute(
                "INSERT INTO devwallet_payments (payment_hash, bolt11, amount_msat, fee_msat,"
                " state, created_at) VALUES (?, ?, ?, 0, 'paid', ?)",
                (payment_hash, pr, amount, now),
            )
            # Our own invoice: settle it too (an internal transfer).
            db.conn.execute(
                "UPDATE devwallet_invoices SET paid_at = ? WHERE payment_hash = ? AND paid_at IS NULL",
                (now, payment_hash),
            )
            return Payment("paid", payment_hash, fee_msat=0)

        return await self.store.write(write)

    async def payment_status(self, payment_hash: str) -> Payment:
        row = await self.store.read(
            lambda db: one(
                db,
                "SELECT state, fee_msat FROM devwallet_payments WHERE payment_hash = ?",
                (payment_hash,),
            )
        )
        if row is None:
            return Payment("failed", payment_hash, reason="no such payment")
        return Payment(row["state"], payment_hash, fee_msat=int(row["fee_msat"]))

    async def balance_msat(self) -> int:
        def read(db: sqlite_utils.Database) -> int:
            received = db.conn.execute(
                "SELECT COALESCE(SUM(amount_msat), 0) FROM devwallet_invoices WHERE paid_at IS NOT NULL"
            ).fetchone()[0]
            paid = db.conn.execute(
                "SELECT COALESCE(SUM(amount_msat + fee_msat), 0) FROM devwallet_payments"
                " WHERE state = 'paid'"
            ).fetchone()[0]
            return int(received) - int(paid)

        return await self.store.read(read)

    async def close(self) -> None:
        return None


def _amount(pr: str) -> int:
    try:
        amount = bolt11.decode(pr).amount_msat
    except Exception:
        raise InvoiceRejected("not a valid BOLT11 invoice") from None
    if amount is None:
        raise InvoiceRejected("invoice has no amount")
    return int(amount)
