"""Top-up invoices as stored: one row per payment hash, before the invoice is shown."""

from __future__ import annotations

from typing import Literal, cast

import attrs

from ledger.store import Connection, Row, rows

TopupState = Literal["pending", "paid", "expired"]


@attrs.frozen
class Topup:
    payment_hash: str
    key_id: int
    amount_msat: int
    bolt11: str
    backend: str
    state: TopupState
    created_at: float
    expires_at: float
    paid_at: float | None = None


def _topup(row: Row) -> Topup:
    return Topup(
        payment_hash=row["payment_hash"],
        key_id=int(row["key_id"]),
        amount_msat=int(row["amount_msat"]),
        bolt11=row["bolt11"],
        backend=row["backend"],
        state=cast(TopupState, row["state"]),
        created_at=float(row["created_at"]),
        expires_at=float(row["expires_at"]),
        paid_at=None if row["paid_at"] is None else float(row["paid_at"]),
    )


def insert_topup(db: Connection, topup: Topup) -> None:
    db.execute(
        "INSERT INTO topups (payment_hash, key_id, amount_msat, bolt11, backend, state,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            topup.payment_hash,
            topup.key_id,
            topup.amount_msat,
            topup.bolt11,
            topup.backend,
            topup.state,
            topup.created_at,
            topup.expires_at,
        ),
    )


def topup(db: Connection, payment_hash: str) -> Topup | None:
    row = db.execute("SELECT * FROM topups WHERE payment_hash = ?", (payment_hash,)).fetchone()
    return None if row is None else _topup(row)


def mark_paid(db: Connection, payment_hash: str, at: float) -> None:
    db.execute(
        "UPDATE topups SET state = 'paid', paid_at = COALESCE(paid_at, ?) WHERE payment_hash = ?",
        (at, payment_hash),
    )


def mark_expired(db: Connection, payment_hash: str) -> None:
    """Expire a top-up that is still pending (a paid one stays paid)."""
    db.execute(
        "UPDATE topups SET state = 'expired' WHERE payment_hash = ? AND state = 'pending'",
        (payment_hash,),
    )


def unsettled(db: Connection, expired_since: float | None = None) -> list[str]:
    """Payment hashes of pending top-ups, and with ``expired_since`` of those expired
    (unpaid) whose expiry is later than that time."""
    found = [r[0] for r in rows(db, "SELECT payment_hash FROM topups WHERE state = 'pending'")]
    if expired_since is not None:
        found += [
            r[0]
            for r in rows(
                db,
                "SELECT payment_hash FROM topups WHERE state = 'expired' AND expires_at > ?",
                (expired_since,),
            )
        ]
    return found
