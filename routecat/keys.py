"""API keys: minted from ``secrets``, shown once, stored only as a SHA-256 hash.

Invariant: the database never holds a key, only ``sha256(key)`` and a short
non-secret prefix (``rc_`` + 8 characters) used for display and operator commands.
A rotated key keeps its id, so its ledger account (and balance) stays with it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import time
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import sqlite_utils

from ledger.store import Store, one, rows
from routecat.errors import InvalidApiKey, InvalidRequest

ALPHABET = string.ascii_letters + string.digits
BODY_LENGTH = 40
PREFIX_LENGTH = 11  # "rc_" + 8 characters: about 47 bits shown, more than 190 kept secret
KEY_PATTERN = re.compile(r"rc_[A-Za-z0-9]{32,128}")
NAME_MAX = 64


def mint_key() -> str:
    return "rc_" + "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@attrs.frozen
class ApiKey:
    id: int
    prefix: str
    name: str
    created_at: str
    revoked: bool = False


def _from_row(row: object) -> ApiKey:
    r = row  # sqlite3.Row
    return ApiKey(
        id=r["id"],  # type: ignore[index]
        prefix=r["prefix"],  # type: ignore[index]
        name=r["name"],  # type: ignore[index]
        created_at=r["created_at"],  # type: ignore[index]
        revoked=r["revoked_at"] is not None,  # type: ignore[index]
    )


def clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidRequest("invalid value for 'name': must not be empty", param="name")
    if len(name) > NAME_MAX:
        raise InvalidRequest(
            f"invalid value for 'name': at most {NAME_MAX} characters", param="name"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidRequest(
            "invalid value for 'name': control characters are not allowed", param="name"
        )
    return name


def parse_bearer(header: str | None) -> str:
    """The key from an ``Authorization`` header, or a 401 that says what is wrong."""
    if not header:
        raise InvalidApiKey("missing API key: send 'Authorization: Bearer rc_...'")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey("the Authorization header must use the Bearer scheme")
    token = token.strip()
    if not KEY_PATTERN.fullmatch(token):
        raise InvalidApiKey("malformed API key: keys look like 'rc_' + 40 letters and digits")
    return token


def insert_key(db: sqlite_utils.Database, name: str, key: str) -> ApiKey:
    created = now_iso()
    cursor = db.conn.execute(
        "INSERT INTO api_keys (key_hash, prefix, name, created_at) VALUES (?, ?, ?, ?)",
        (hash_key(key), key[:PREFIX_LENGTH], name, created),
    )
    assert cursor.lastrowid is not None
    return ApiKey(cursor.lastrowid, key[:PREFIX_LENGTH], name, created)


CACHE_TTL = 30.0
CACHE_MAX = 100_000


@attrs.define(eq=False)
class KeyRing:
    """Registers and authenticates keys against the store.

    Valid keys are cached in memory by hash for ``CACHE_TTL`` seconds, so a request
    costs no database read; the operator's revoke and rotate commands clear the cache
    of the running gateway through the admin socket, so they take effect at once.
    """

    store: Store
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[ApiKey, float]] = attrs.Factory(dict)

    def invalidate(self) -> None:
        self._cache.clear()

    async def register(self, name: str) -> tuple[ApiKey, str]:
        name = clean_name(name)
        key = mint_key()
        record = await self.store.write(lambda db: insert_key(db, name, key))
        return record, key

    async def authenticate(self, header: str | None) -> ApiKey:
        key = parse_bearer(header)
        digest = hash_key(key)
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = await self.store.read(
            lambda db: one(db, "SELECT * FROM api_keys WHERE key_hash = ?", (digest,))
        )
        if row is None or row["revoked_at"] is not None:
            raise InvalidApiKey("unknown or revoked API key")
        record = _from_row(row)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (record, now + CACHE_TTL)
        return record


# -- operator commands (synchronous, offline) ----------------------------------------


def list_keys(store: Store) -> list[ApiKey]:
    return [
        _from_row(r)
        for r in store.read_sync(lambda db: rows(db, "SELECT * FROM api_keys ORDER BY id"))
    ]


def find_by_prefix(db: sqlite_utils.Database, prefix: str) -> ApiKey:
    """One key by its displayed prefix (or a longer part of it); ambiguity is refused."""
    if not prefix.startswith("rc_") or len(prefix) < 5:
        raise LookupError("give at least 'rc_' and two more characters of the key's prefix")
    matches = rows(
        db,
        "SELECT * FROM api_keys WHERE prefix LIKE ? ESCAPE '\\' OR ? LIKE prefix || '%'",
        (prefix.replace("_", "\\_") + "%", prefix),
    )
    if not matches:
        raise LookupError(f"no key with prefix {prefix}")
    if len(matches) > 1:
        raise LookupError(f"prefix {prefix} is ambiguous ({len(matches)} keys): give more of it")
    return _from_row(matches[0])


def revoke_key(store: Store, prefix: str) -> ApiKey:
    def revoke(db: sqlite_utils.Database) -> ApiKey:
        record = find_by_prefix(db, prefix)
        db.conn.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (now_iso(), record.id),
        )
        return attrs.evolve(record, revoked=True)

    return store.write_sync(revoke)


def rotate_key(store: Store, prefix: str) -> tuple[ApiKey, str]:
    """A new secret for the same key id: balance, quota and history stay."""
    key = mint_key()

    def rotate(db: sqlite_utils.Database) -> ApiKey:
        record = find_by_prefix(db, prefix)
        if record.revoked:
            raise LookupError(f"key {record.prefix} is revoked")
        db.conn.execute(
            "UPDATE api_keys SET key_hash = ?, prefix = ? WHERE id = ?",
            (hash_key(key), key[:PREFIX_LENGTH], record.id),
        )
        return attrs.evolve(record, prefix=key[:PREFIX_LENGTH])

    return store.write_sync(rotate), key
