"""``routecat db copy``: move a single-process install (SQLite) into a shared database.

Invariants: the target must be empty (no account, no key: a copy never merges two
histories); every row of every table that matters is copied with its ids, in one
target transaction (all or nothing); what only describes running processes (replicas,
the node directory, leases, cache epochs, rate-limit hits) is not copied. The caller
proves the result with ``ledger check`` on both sides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ledger.store import Connection, Storage

# Parents before children (postings need transactions and accounts).
TABLES = (
    "accounts",
    "transactions",
    "postings",
    "reservations",
    "holds",
    "api_keys",
    "nodes",
    "jobs",
    "models_seen",
    "free_usage",
    "free_claims",
    "subsidy_days",
    "topups",
    "payouts",
    "payout_holds",
    "devwallet_invoices",
    "devwallet_payments",
)
# Tables whose integer ``id`` is generated: the target's generator must start after them.
GENERATED_IDS = ("transactions", "postings", "api_keys", "payouts")
CHUNK = 5000


def _chunk(table: str, offset: int) -> Callable[[Connection], list[Any]]:
    def read(db: Connection) -> list[Any]:
        # A SQLite source: rowid gives a stable order for every table.
        return list(
            db.execute(
                f"SELECT * FROM {table} ORDER BY rowid LIMIT ? OFFSET ?",
                (CHUNK, offset),
            ).fetchall()
        )

    return read


def is_empty(db: Connection) -> bool:
    accounts = db.execute("SELECT COUNT(*) FROM accounts").fetchone()[0]
    keys = db.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
    return int(accounts) == 0 and int(keys) == 0


def copy(source: Storage, target: Storage, *, postgres_target: bool) -> dict[str, int]:
    """Copy every table from ``source`` into the empty ``target``; rows per table."""
    copied: dict[str, int] = {}

    def write(db: Connection) -> None:
        if not is_empty(db):
            raise LookupError("the target database already holds accounts or keys: not copying")
        for table in TABLES:
            offset = 0
            while True:
                rows = source.read_sync(_chunk(table, offset))
                if not rows:
                    break
                columns = list(rows[0].keys())
                sql = (
                    f"INSERT INTO {table} ({', '.join(columns)})"
                    f" VALUES ({', '.join('?' for _ in columns)})"
                )
                for row in rows:
                    db.execute(sql, tuple(row[c] for c in columns))
                offset += len(rows)
            copied[table] = offset
        if postgres_target:
            for table in GENERATED_IDS:
                db.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
                )

    target.write_sync(write)
    return copied
