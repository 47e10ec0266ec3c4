"""Payouts as stored (one row per attempt to pay a provider) and the holds on them."""

from __future__ import annotations

from typing import Literal, cast

import attrs

from ledger.store import Connection, Row, rows

PayoutState = Literal["resolving", "pending", "paid", "failed"]


@attrs.frozen
class PayoutRecord:
    id: int
    node_id: str
    address: str
    amount_msat: int
    fee_msat: int
    payment_hash: str | None
    bolt11: str | None
    state: PayoutState
    reason: str
    created_at: float
    updated_at: float


def _payout(row: Row) -> PayoutRecord:
    return PayoutRecord(
        id=int(row["id"]),
        node_id=row["node_id"],
        address=row["address"],
        amount_msat=int(row["amount_msat"]),
        fee_msat=int(row["fee_msat"]),
        payment_hash=row["payment_hash"],
        bolt11=row["bolt11"],
        state=cast(PayoutState, row["state"]),
        reason=row["reason"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
    )


@attrs.frozen
class PayoutHold:
    """Why a provider's payout is not being sent, and when it is tried again."""

    node_id: str
    reason: str
    failures: int
    next_attempt_at: float
    updated_at: float


def _hold(row: Row) -> PayoutHold:
    return PayoutHold(
        node_id=row["node_id"],
        reason=row["reason"],
        failures=int(row["failures"]),
        next_attempt_at=float(row["next_attempt_at"]),
        updated_at=float(row["updated_at"]),
    )


@attrs.frozen
class PayoutTotals:
    paid_msat: int
    pending_msat: int


def insert_pending(
    db: Connection,
    node_id: str,
    address: str,
    amount_msat: int,
    payment_hash: str,
    bolt11: str,
    at: float,
) -> int:
    found = db.execute(
        "INSERT INTO payouts (node_id, address, amount_msat, payment_hash, bolt11, state,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?) RETURNING id",
        (node_id, address, amount_msat, payment_hash, bolt11, at, at),
    ).fetchone()
    return int(found[0])


def payout(db: Connection, payout_id: int) -> PayoutRecord | None:
    row = db.execute("SELECT * FROM payouts WHERE id = ?", (payout_id,)).fetchone()
    return None if row is None else _payout(row)


def has_pending(db: Connection, node_id: str) -> bool:
    found = db.execute(
        "SELECT 1 FROM payouts WHERE node_id = ? AND state = 'pending'", (node_id,)
    ).fetchone()
    return found is not None


def pending(db: Connection) -> list[PayoutRecord]:
    return [_payout(r) for r in rows(db, "SELECT * FROM payouts WHERE state = 'pending'")]


def mark_paid(db: Connection, payout_id: int, fee_msat: int, at: float) -> None:
    db.execute(
        "UPDATE payouts SET state = 'paid', fee_msat = ?, updated_at = ? WHERE id = ?",
        (fee_msat, at, payout_id),
    )


def mark_failed(db: Connection, payout_id: int, reason: str, at: float) -> None:
    db.execute(
        "UPDATE payouts SET state = 'failed', reason = ?, updated_at = ? WHERE id = ?",
        (reason, at, payout_id),
    )


def recent(db: Connection, limit: int = 200, node_id: str | None = None) -> list[PayoutRecord]:
    """The latest payouts, newest first (of one node, with ``node_id``)."""
    if node_id is None:
        found = rows(db, "SELECT * FROM payouts ORDER BY id DESC LIMIT ?", (limit,))
    else:
        found = rows(
            db, "SELECT * FROM payouts WHERE node_id = ? ORDER BY id DESC LIMIT ?", (node_id, limit)
        )
    return [_payout(r) for r in found]


def totals(db: Connection, node_id: str) -> PayoutTotals:
    """Paid and pending amounts over every payout of a node."""
    row = db.execute(
        "SELECT COALESCE(SUM(CASE WHEN state = 'paid' THEN amount_msat END), 0),"
        " COALESCE(SUM(CASE WHEN state = 'pending' THEN amount_msat END), 0)"
        " FROM payouts WHERE node_id = ?",
        (node_id,),
    ).fetchone()
    return PayoutTotals(int(row[0]), int(row[1]))


def hold(db: Connection, node_id: str) -> PayoutHold | None:
    row = db.execute("SELECT * FROM payout_holds WHERE node_id = ?", (node_id,)).fetchone()
    return None if row is None else _hold(row)


def holds(db: Connection) -> list[PayoutHold]:
    return [_hold(r) for r in rows(db, "SELECT * FROM payout_holds ORDER BY updated_at DESC")]


def put_hold(db: Connection, hold: PayoutHold) -> None:
    db.execute(
        "INSERT INTO payout_holds (node_id, reason, failures, next_attempt_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET reason = excluded.reason,"
        " failures = excluded.failures, next_attempt_at = excluded.next_attempt_at,"
        " updated_at = excluded.updated_at",
        (hold.node_id, hold.reason, hold.failures, hold.next_attempt_at, hold.updated_at),
    )


def clear_hold(db: Connection, node_id: str) -> None:
    db.execute("DELETE FROM payout_holds WHERE node_id = ?", (node_id,))
