"""The gateway's own tables (keys, nodes, jobs, quota, top-ups, payouts), as migrations.

Invariant: migrations only ever append; a step once released is never edited.
The ledger's tables are migrated by ``ledger`` itself; ``open_store`` applies both.

Timestamps: columns a person reads (``*_at`` of keys, nodes and jobs) hold ISO-8601 UTC
text (``routecat.clock.iso``), so the audit and the pages sort and show them as they
are; columns that timers compare (top-ups, payouts, holds, dev wallet) hold epoch
seconds (REAL). Each column keeps one kind for ever (migrations only append).
"""

from __future__ import annotations

import re

from ledger import book
from ledger.store import Migration, Storage, Store

COMPONENT = "routecat"

MIGRATIONS = (
    Migration(
        1,
        """
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        );
        CREATE INDEX api_keys_prefix ON api_keys (prefix);
        CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            secret_hash TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            payout_address TEXT NOT NULL DEFAULT '',
            payout_threshold_sats INTEGER,
            created_at TEXT NOT NULL,
            last_seen_at TEXT NOT NULL,
            banned_at TEXT,
            ban_reason TEXT
        );
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            key_id INTEGER NOT NULL,
            node_id TEXT,
            model TEXT NOT NULL,
            kind TEXT NOT NULL,
            stream INTEGER NOT NULL,
            free INTEGER NOT NULL DEFAULT 0,
            outcome TEXT NOT NULL,
            tokens_in INTEGER NOT NULL,
            tokens_out INTEGER NOT NULL,
            reported_in INTEGER,
            reported_out INTEGER,
            bytes_out INTEGER NOT NULL DEFAULT 0,
            duration_ms INTEGER NOT NULL,
            ttft_ms INTEGER,
            cost_msat INTEGER NOT NULL DEFAULT 0,
            provider_msat INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            finished_at TEXT NOT NULL
        );
        CREATE INDEX jobs_finished ON jobs (finished_at);
        CREATE INDEX jobs_node ON jobs (node_id, finished_at);
        CREATE TABLE models_seen (
            model TEXT PRIMARY KEY,
            last_seen REAL NOT NULL
        );
        """,
    ),
    Migration(
        2,
        """
        CREATE TABLE free_usage (
            key_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            used INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, day)
        );
        CREATE TABLE subsidy_days (
            day TEXT PRIMARY KEY,
            spent_msat INTEGER NOT NULL DEFAULT 0
        );
        """,
    ),
    Migration(
        3,
        """
        CREATE TABLE topups (
            payment_hash TEXT PRIMARY KEY,
            key_id INTEGER NOT NULL,
            amount_msat INTEGER NOT NULL,
            bolt11 TEXT NOT NULL,
            backend TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            paid_at REAL
        );
        CREATE INDEX topups_state ON topups (state, expires_at);
        CREATE INDEX topups_key ON topups (key_id, created_at);
        CREATE TABLE payouts (
            id INTEGER PRIMARY KEY,
            node_id TEXT NOT NULL,
            address TEXT NOT NULL,
            amount_msat INTEGER NOT NULL,
            fee_msat INTEGER NOT NULL DEFAULT 0,
            payment_hash TEXT,
            bolt11 TEXT,
            state TEXT NOT NULL DEFAULT 'resolving',
            reason TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX payouts_node ON payouts (node_id, state);
        CREATE INDEX payouts_state ON payouts (state);
        CREATE TABLE devwallet_invoices (
            payment_hash TEXT PRIMARY KEY,
            bolt11 TEXT NOT NULL,
            amount_msat INTEGER NOT NULL,
            memo TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            paid_at REAL
        );
        CREATE TABLE devwallet_payments (
            payment_hash TEXT PRIMARY KEY,
            bolt11 TEXT NOT NULL,
            amount_msat INTEGER NOT NULL,
            fee_msat INTEGER NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL
        );
        """,
    ),
    Migration(
        4,
        """
        CREATE TABLE payout_holds (
            node_id TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            failures INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        """,
    ),
    Migration(
        5,
        """
        CREATE TABLE replicas (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            started_at REAL NOT NULL,
            seen_at REAL NOT NULL
        );
        CREATE TABLE node_directory (
            node_id TEXT PRIMARY KEY,
            replica_id TEXT NOT NULL,
            models TEXT NOT NULL,
            capacity INTEGER NOT NULL,
            in_flight INTEGER NOT NULL,
            seen_at REAL NOT NULL
        );
        CREATE INDEX node_directory_replica ON node_directory (replica_id);
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            until REAL NOT NULL
        );
        CREATE TABLE epochs (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        );
        CREATE TABLE rate_hits (
            bucket TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX rate_hits_bucket ON rate_hits (bucket, at);
        CREATE TABLE free_claims (
            job_id TEXT PRIMARY KEY,
            key_id INTEGER NOT NULL,
            day TEXT NOT NULL
        );
        """,
    ),
    Migration(
        6,
        """
        CREATE INDEX jobs_key ON jobs (key_id, finished_at);
        """,
    ),
    Migration(
        7,
        """
        CREATE TABLE stock_registrations (
            key_hash TEXT PRIMARY KEY,
            node_id TEXT NOT NULL,
            models TEXT NOT NULL,
            version TEXT NOT NULL,
            threshold_sats INTEGER NOT NULL,
            updated_at REAL NOT NULL
        );
        """,
    ),
)


def open_store(database: str) -> Storage:
    """The store for ``database``, with the ledger's and the gateway's tables migrated:
    ``postgresql://...`` (or ``postgres://``) is PostgreSQL, shared by replicas; anything
    else is a SQLite file (``sqlite:///path`` or a plain path)."""
    store: Storage
    if database.startswith(("postgresql://", "postgres://")):
        from ledger.postgres import PostgresStore  # psycopg: the postgres extra

        store = PostgresStore.open(database)
    else:
        store = Store.open(sqlite_path(database))
    try:
        store.migrate(book.COMPONENT, book.MIGRATIONS)
        store.migrate(COMPONENT, MIGRATIONS)
    except BaseException:
        store.close()
        raise
    return store


def sqlite_path(database: str) -> str:
    """The file of a SQLite database setting: ``sqlite:///rel/path``, ``sqlite:////abs``
    or a plain path."""
    return (
        database.removeprefix("sqlite://").removeprefix("/")
        if database.startswith("sqlite:///")
        else database
    )


def is_postgres(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def redact(database: str) -> str:
    """A database setting fit for messages and logs: a URL's password is masked."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", database)
