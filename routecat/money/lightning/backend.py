"""The one Lightning backend interface, in integer msat, and the checks every invoice
we are asked to pay must pass.

Invariant: only a *definite* answer from a backend is a failure or an expiry; a
timeout, a 5xx, a connection error or anything unexpected is *pending* and is
reconciled later by payment hash. Money is never written off on a guess.
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

import attrs
import bolt11

from routecat.money.lightning.errors import InvoiceRejected

InvoiceState = Literal["pending", "paid", "expired"]
PaymentState = Literal["pending", "paid", "failed"]

NETWORK_PREFIXES = {"bitcoin": "bc", "testnet": "tb", "signet": "tbs", "regtest": "bcrt"}
NETWORKS_BY_PREFIX = {prefix: network for network, prefix in NETWORK_PREFIXES.items()}


@attrs.frozen
class Invoice:
    payment_hash: str
    bolt11: str
    amount_msat: int
    expires_at: float


@attrs.frozen
class InvoiceStatus:
    state: InvoiceState
    amount_received_msat: int | None = None


@attrs.frozen
class Payment:
    state: PaymentState
    payment_hash: str
    fee_msat: int = 0
    reason: str = ""


class Backend(Protocol):
    name: str
    network: str  # bitcoin, testnet, signet, regtest

    async def create_invoice(self, amount_msat: int, memo: str, expiry: int) -> Invoice: ...

    async def invoice_status(self, payment_hash: str) -> InvoiceStatus: ...

    async def pay_invoice(self, bolt11: str, max_fee_msat: int) -> Payment: ...

    async def payment_status(self, payment_hash: str) -> Payment: ...

    async def balance_msat(self) -> int: ...

    async def close(self) -> None: ...


def check_invoice(
    pr: str, amount_msat: int, network: str, now: float | None = None
) -> bolt11.Bolt11:
    """Decode a BOLT11 invoice and check it before paying: valid signature, right
    network, an amount equal to the one asked, not expired."""
    try:
        decoded = bolt11.decode(pr)
    except Exception as exc:  # the library raises many kinds; all mean "not a valid invoice"
        raise InvoiceRejected(f"not a valid BOLT11 invoice: {type(exc).__name__}") from None
    prefix = NETWORK_PREFIXES.get(network, network)
    if decoded.currency != prefix:
        raise InvoiceRejected(f"invoice is for network '{decoded.currency}', not '{prefix}'")
    if decoded.amount_msat is None:
        raise InvoiceRejected("invoice has no amount")
    if int(decoded.amount_msat) != amount_msat:
        raise InvoiceRejected(
            f"invoice amount {int(decoded.amount_msat)} msat differs from the {amount_msat} asked"
        )
    now = time.time() if now is None else now
    if decoded.date + decoded.expiry <= now:
        raise InvoiceRejected("invoice has expired")
    if not decoded.payee:
        raise InvoiceRejected("invoice signature does not yield a payee")
    return decoded
