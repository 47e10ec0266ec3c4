"""The double-entry book: accounts, balanced transactions, reservations, holds.

Invariants owned here (``check`` proves them on demand):
- every transaction's postings sum to zero, so all accounts sum to zero at every commit;
- every account's ``balance_msat`` equals the sum of its postings;
- a transaction with a given idempotency key exists at most once (``UNIQUE``), so a
  settlement, credit or top-up replayed for any reason changes nothing;
- ``reserved_msat`` of an account equals the sum of its open reservations.

All amounts are integer millisatoshis. Functions here run inside a write transaction
of ``ledger.store.Store`` (they take the ``sqlite_utils.Database`` of that
transaction); none of them commits.

Sign convention: a posting of +x raises the account's balance. A user's balance is
what the operator owes the user; a top-up posts +x to the user and -x to
``lightning:in`` (money that arrived over Lightning); spending posts -cost to the user
and +share to the provider and the fee account.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import sqlite_utils

from ledger.errors import Unbalanced
from ledger.store import Migration, one, rows

COMPONENT = "ledger"

# Well-known accounts.
OPERATOR_FEE = "operator:fee"
OPERATOR_EQUITY = "operator:equity"
SUBSIDY = "operator:subsidy"
LIGHTNING_IN = "lightning:in"
LIGHTNING_OUT = "lightning:out"
PAYOUTS_IN_FLIGHT = "payouts:in_flight"
ROUTING_FEES = "operator:routing_fees"


def user_account(key_id: int) -> str:
    return f"user:{key_id}"


def provider_account(node_id: str) -> str:
    return f"provider:{node_id}"


MIGRATIONS = (
    Migration(
        1,
        """
        CREATE TABLE accounts (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            balance_msat INTEGER NOT NULL DEFAULT 0,
            reserved_msat INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL
        );
        CREATE TABLE transactions (
            id INTEGER PRIMARY KEY,
            idempotency_key TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            memo TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL
        );
        CREATE TABLE postings (
            id INTEGER PRIMARY KEY,
            tx_id INTEGER NOT NULL REFERENCES transactions (id),
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL
        );
        CREATE INDEX postings_account ON postings (account, tx_id);
        CREATE INDEX postings_tx ON postings (tx_id);
        CREATE TABLE reservations (
            id TEXT PRIMARY KEY,
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL,
            created_at REAL NOT NULL
        );
        CREATE TABLE holds (
            tx_id INTEGER NOT NULL REFERENCES transactions (id),
            account TEXT NOT NULL REFERENCES accounts (id),
            amount_msat INTEGER NOT NULL,
            release_at REAL NOT NULL
        );
        CREATE INDEX holds_account ON holds (account, release_at);
        """,
    ),
)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ensure_account(db: sqlite_utils.Database, account: str) -> None:
    kind = account.split(":", 1)[0]
    db.conn.execute(
        "INSERT INTO accounts (id, kind, created_at) VALUES (?, ?, ?) ON CONFLICT(id) DO NOTHING",
        (account, kind, now_iso()),
    )


@attrs.frozen
class Posting:
    account: str
    amount_msat: int


def post(
    db: sqlite_utils.Database,
    key: str,
    kind: str,
    postings: Sequence[Posting],
    memo: str = "",
) -> int | None:
    """Record one balanced transaction; None if ``key`` was already recorded."""
    if sum(p.amount_msat for p in postings) != 0:
        raise Unbalanced(f"transaction {key} does not balance: {postings}")
    if any(not isinstance(p.amount_msat, int) or isinstance(p.amount_msat, bool) for p in postings):
        raise TypeError("amounts must be integer msat")
    cursor = db.conn.execute(
        "INSERT INTO transactions (idempotency_key, kind, memo, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(idempotency_key) DO NOTHING",
        (key, kind, memo, now_iso()),
    )
    if cursor.rowcount == 0:
        return None
    tx_id = cursor.lastrowid
    for p in postings:
        if p.amount_msat == 0:
            continue
        ensure_account(db, p.account)
        db.conn.execute(
            "INSERT INTO postings (tx_id, account, amount_msat) VALUES (?, ?, ?)",
            (tx_id, p.account, p.amount_msat),
        )
        db.conn.execute(
            "UPDATE accounts SET balance_msat = balance_msat + ? WHERE id = ?",
            (p.amount_msat, p.account),
        )
    return tx_id


def transaction_exists(db: sqlite_utils.Database, key: str) -> bool:
    return one(db, "SELECT 1 FROM transactions WHERE idempotency_key = ?", (key,)) is not None


def balance(db: sqlite_utils.Database, account: str) -> tuple[int, int]:
    """(balance, reserved) of an account; (0, 0) if it has never been used."""
    row = one(db, "SELECT balance_msat, reserved_msat FROM accounts WHERE id = ?", (account,))
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def reserve(
    db: sqlite_utils.Database, reservation_id: str, account: str, amount_msat: int, now: float
) -> bool:
    """Reserve ``amount_msat`` if ``balance - reserved > 0`` (checked and taken atomically)."""
    if amount_msat < 0:
        raise ValueError("a reservation cannot be negative")
    ensure_account(db, account)
    cursor = db.conn.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ?"
        " WHERE id = ? AND balance_msat - reserved_msat > 0",
        (amount_msat, account),
    )
    if cursor.rowcount == 0:
        return False
    db.conn.execute(
        "INSERT INTO reservations (id, account, amount_msat, created_at) VALUES (?, ?, ?, ?)",
        (reservation_id, account, amount_msat, now),
    )
    return True


def reserve_unconditionally(
    db: sqlite_utils.Database, reservation_id: str, account: str, amount_msat: int, now: float
) -> None:
    ensure_account(db, account)
    db.conn.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat + ? WHERE id = ?", (amount_msat, account)
    )
    db.conn.execute(
        "INSERT INTO reservations (id, account, amount_msat, created_at) VALUES (?, ?, ?, ?)",
        (reservation_id, account, amount_msat, now),
    )


def release(db: sqlite_utils.Database, reservation_id: str) -> int:
    """Release a reservation; idempotent. Returns the amount released (0 if none)."""
    row = one(db, "SELECT account, amount_msat FROM reservations WHERE id = ?", (reservation_id,))
    if row is None:
        return 0
    db.conn.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
    db.conn.execute(
        "UPDATE accounts SET reserved_msat = reserved_msat - ? WHERE id = ?",
        (row["amount_msat"], row["account"]),
    )
    return int(row["amount_msat"])


def sweep_reservations(
    db: sqlite_utils.Database, older_than: float, keep: Iterable[str] = ()
) -> list[str]:
    """Release reservations created before ``older_than`` except those in ``keep``
    (jobs still running). After a crash, with nothing kept, it releases them all."""
    kept = set(keep)
    stale = [
        r["id"]
        for r in rows(db, "SELECT id FROM reservations WHERE created_at < ?", (older_than,))
        if r["id"] not in kept
    ]
    for reservation_id in stale:
        release(db, reservation_id)
    return stale


def hold(
    db: sqlite_utils.Database, tx_id: int, account: str, amount_msat: int, release_at: float
) -> None:
    """Mark part of an account's balance as not payable before ``release_at``."""
    db.conn.execute(
        "INSERT INTO holds (tx_id, account, amount_msat, release_at) VALUES (?, ?, ?, ?)",
        (tx_id, account, amount_msat, release_at),
    )


def held(db: sqlite_utils.Database, account: str, now: float) -> int:
    row = one(
        db,
        "SELECT COALESCE(SUM(amount_msat), 0) FROM holds WHERE account = ? AND release_at > ?",
        (account, now),
    )
    return int(row[0]) if row else 0


@attrs.frozen
class Check:
    accounts: int
    transactions: int
    postings: int
    total_msat: int
    mismatched_balances: list[tuple[str, int, int]]
    unbalanced_transactions: list[int]
    mismatched_reservations: list[tuple[str, int, int]]

    @property
    def ok(self) -> bool:
        return (
            self.total_msat == 0
            and not self.mismatched_balances
            and not self.unbalanced_transactions
            and not self.mismatched_reservations
        )


def check(db: sqlite_utils.Database) -> Check:
    """Prove the invariants from the raw postings (not from the cached balances)."""
    mismatched = [
        (r[0], int(r[1]), int(r[2]))
        for r in db.conn.execute(
            "SELECT a.id, a.balance_msat, COALESCE(SUM(p.amount_msat), 0) AS s"
            " FROM accounts a LEFT JOIN postings p ON p.account = a.id"
            " GROUP BY a.id HAVING a.balance_msat != s"
        )
    ]
    unbalanced = [
        int(r[0])
        for r in db.conn.execute(
            "SELECT tx_id FROM postings GROUP BY tx_id HAVING SUM(amount_msat) != 0"
        )
    ]
    reservations = [
        (r[0], int(r[1]), int(r[2]))
        for r in db.conn.execute(
            "SELECT a.id, a.reserved_msat, COALESCE(SUM(r.amount_msat), 0) AS s"
            " FROM accounts a LEFT JOIN reservations r ON r.account = a.id"
            " GROUP BY a.id HAVING a.reserved_msat != s"
        )
    ]
    total = db.conn.execute("SELECT COALESCE(SUM(amount_msat), 0) FROM postings").fetchone()[0]
    counts = [
        db.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("accounts", "transactions", "postings")
    ]
    return Check(counts[0], counts[1], counts[2], int(total), mismatched, unbalanced, reservations)


def history(db: sqlite_utils.Database, account: str, limit: int = 100) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in rows(
            db,
            "SELECT t.id, t.created_at, t.kind, t.idempotency_key, t.memo, p.amount_msat"
            " FROM postings p JOIN transactions t ON t.id = p.tx_id"
            " WHERE p.account = ? ORDER BY t.id DESC LIMIT ?",
            (account, limit),
        )
    ]


def accounts(db: sqlite_utils.Database) -> list[sqlite3.Row]:
    return rows(db, "SELECT id, kind, balance_msat, reserved_msat FROM accounts ORDER BY id")
