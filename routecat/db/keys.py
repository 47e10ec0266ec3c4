"""API keys as stored: a SHA-256 hash and a short display prefix, never the key."""

from __future__ import annotations

import attrs

from ledger.store import Connection, Row, rows


@attrs.frozen
class ApiKey:
    id: int
    prefix: str
    name: str
    created_at: str
    revoked: bool = False


def _key(row: Row) -> ApiKey:
    return ApiKey(
        id=int(row["id"]),
        prefix=row["prefix"],
        name=row["name"],
        created_at=row["created_at"],
        revoked=row["revoked_at"] is not None,
    )


def insert_key(db: Connection, key_hash: str, prefix: str, name: str, created_at: str) -> ApiKey:
    found = db.execute(
        "INSERT INTO api_keys (key_hash, prefix, name, created_at) VALUES (?, ?, ?, ?)"
        " RETURNING id",
        (key_hash, prefix, name, created_at),
    ).fetchone()
    return ApiKey(int(found[0]), prefix, name, created_at)


def key_by_hash(db: Connection, key_hash: str) -> ApiKey | None:
    row = db.execute("SELECT * FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone()
    return None if row is None else _key(row)


def all_keys(db: Connection) -> list[ApiKey]:
    return [_key(r) for r in rows(db, "SELECT * FROM api_keys ORDER BY id")]


def keys_by_prefix(db: Connection, prefix: str) -> list[ApiKey]:
    """Keys whose prefix starts with ``prefix``, or that ``prefix`` starts with."""
    return [
        _key(r)
        for r in rows(
            db,
            "SELECT * FROM api_keys WHERE prefix LIKE ? ESCAPE '\\' OR ? LIKE prefix || '%'",
            (prefix.replace("_", "\\_") + "%", prefix),
        )
    ]


def revoke_key(db: Connection, key_id: int, at: str) -> None:
    db.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (at, key_id)
    )


def set_key_hash(db: Connection, key_id: int, key_hash: str, prefix: str) -> None:
    db.execute(
        "UPDATE api_keys SET key_hash = ?, prefix = ? WHERE id = ?", (key_hash, prefix, key_id)
    )
