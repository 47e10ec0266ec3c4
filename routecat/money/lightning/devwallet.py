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

import attrs
import bolt11
from bolt11.models.tags import TagChar, Tags
from coincurve import PrivateKey

from ledger.store import Connection, Storage
from routecat.clock import Clock
from routecat.db import devwallet as stored
from routecat.money.lightning.backend import Invoice, InvoiceStatus, Payment, check_invoice
from routecat.money.lightning.errors import InvoiceRejected, LightningError


@attrs.define(eq=False)
class DevWallet:
    store: Storage
    clock: Clock
    name: str = "dev"
    network: str = "regtest"
    _key: PrivateKey = attrs.Factory(PrivateKey)

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice:
        now = self.clock.wall()
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

        await self.store.write(
            lambda db: stored.insert_invoice(
                db, payment_hash, pr, amount_msat, memo, now, expires_at
            )
        )
        return Invoice(payment_hash, pr, amount_msat, expires_at)

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus:
        found = await self.store.read(lambda db: stored.invoice(db, payment_hash))
        if found is None:
            raise LightningError(f"the dev wallet has no invoice {payment_hash}")
        if found.paid_at is not None:
            return InvoiceStatus("paid", found.amount_msat)
        if found.expires_at <= self.clock.wall():
            return InvoiceStatus("expired")
        return InvoiceStatus("pending")

    async def settle_own(self, pr: str) -> str:
        """Pay one of our own invoices, as an outside payer would (``routecat wallet pay``)."""
        try:
            decoded = bolt11.decode(pr)
        except Exception:  # any decoding failure
            raise InvoiceRejected("not a valid BOLT11 invoice") from None
        now = self.clock.wall()

        def write(db: Connection) -> str:
            found = stored.invoice(db, decoded.payment_hash)
            if found is None:
                raise InvoiceRejected("this invoice was not issued by this gateway's dev wallet")
            if found.paid_at is not None:
                raise InvoiceRejected("this invoice is already paid")
            if found.expires_at <= now:
                raise InvoiceRejected("this invoice has expired")
            stored.mark_invoice_paid(db, decoded.payment_hash, now)
            return str(decoded.payment_hash)

        return await self.store.write(write)

    async def pay_invoice(self, pr: str, max_fee_msat: int) -> Payment:
        decoded = check_invoice(pr, _amount(pr), self.network, self.clock.wall())
        amount = int(decoded.amount_msat or 0)
        balance = await self.balance_msat()
        payment_hash = str(decoded.payment_hash)
        if amount > balance:
            return Payment("failed", payment_hash, reason="insufficient balance in the dev wallet")
        now = self.clock.wall()

        def write(db: Connection) -> Payment:
            if stored.payment(db, payment_hash) is not None:
                return Payment("failed", payment_hash, reason="invoice already paid")
            stored.insert_payment(db, payment_hash, pr, amount, now)
            # Our own invoice: settle it too (an internal transfer).
            stored.mark_invoice_paid(db, payment_hash, now)
            return Payment("paid", payment_hash, fee_msat=0)

        return await self.store.write(write)

    async def payment_status(self, payment_hash: str) -> Payment:
        found = await self.store.read(lambda db: stored.payment(db, payment_hash))
        if found is None:
            return Payment("failed", payment_hash, reason="no such payment")
        return Payment(
            "paid" if found.state == "paid" else "failed", payment_hash, fee_msat=found.fee_msat
        )

    async def balance_msat(self) -> int:
        return await self.store.read(stored.balance_msat)

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
