"""The dev wallet's invoices and payments (regtest money that exists only here)."""

from __future__ import annotations

import attrs

from ledger.store import Connection


@attrs.frozen
class DevInvoice:
    amount_msat: int
    expires_at: float
    paid_at: float | None


def insert_invoice(
    db: Connection,
    payment_hash: str,
    bolt11: str,
    amount_msat: int,
    memo: str,
    created_at: float,
    expires_at: float,
) -> None:
    db.execute(
        "INSERT INTO devwallet_invoices (payment_hash, bolt11, amount_msat, memo,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        (payment_hash, bolt11, amount_msat, memo, created_at, expires_at),
    )


def invoice(db: Connection, payment_hash: str) -> DevInvoice | None:
    row = db.execute(
        "SELECT amount_msat, expires_at, paid_at FROM devwallet_invoices WHERE payment_hash = ?",
        (payment_hash,),
    ).fetchone()
    if row is None:
        return None
    paid_at = row["paid_at"]
    return DevInvoice(
        int(row["amount_msat"]), float(row["expires_at"]), None if paid_at is None else paid_at
    )


def mark_invoice_paid(db: Connection, payment_hash: str, at: float) -> None:
    db.execute(
        "UPDATE devwallet_invoices SET paid_at = ? WHERE payment_hash = ? AND paid_at IS NULL",
        (at, payment_hash),
    )


@attrs.frozen
class DevPayment:
    state: str
    fee_msat: int


def payment(db: Connection, payment_hash: str) -> DevPayment | None:
    row = db.execute(
        "SELECT state, fee_msat FROM devwallet_payments WHERE payment_hash = ?", (payment_hash,)
    ).fetchone()
    return None if row is None else DevPayment(row["state"], int(row["fee_msat"]))


def insert_payment(
    db: Connection, payment_hash: str, bolt11: str, amount_msat: int, at: float
) -> None:
    db.execute(
        "INSERT INTO devwallet_payments (payment_hash, bolt11, amount_msat, fee_msat,"
        " state, created_at) VALUES (?, ?, ?, 0, 'paid', ?)",
        (payment_hash, bolt11, amount_msat, at),
    )


def balance_msat(db: Connection) -> int:
    """Received (paid invoices) minus sent (paid payments and their fees)."""
    received = db.execute(
        "SELECT COALESCE(SUM(amount_msat), 0) FROM devwallet_invoices WHERE paid_at IS NOT NULL"
    ).fetchone()[0]
    sent = db.execute(
        "SELECT COALESCE(SUM(amount_msat + fee_msat), 0) FROM devwallet_payments"
        " WHERE state = 'paid'"
    ).fetchone()[0]
    return int(received) - int(sent)
