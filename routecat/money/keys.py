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
from collections.abc import Callable
from typing import Any, cast

import attrs

from ledger.store import Connection, Storage
from routecat.clock import Clock
from routecat.db import keys as stored
from routecat.db.cluster import bump_epoch
from routecat.db.keys import ApiKey
from routecat.errors import InvalidApiKey, InvalidRequest

ALPHABET = string.ascii_letters + string.digits
BODY_LENGTH = 40
PREFIX_LENGTH = 11  # "rc_" + 8 characters: about 47 bits shown, more than 190 kept secret
KEY_PATTERN = re.compile(r"rc_[A-Za-z0-9]{32,128}")
NAME_MAX = 64
# The epoch that replicas watch to drop cached keys (revoked or rotated elsewhere).
KEYS_EPOCH = "keys"


def mint_key() -> str:
    return "rc_" + "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


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


def insert_key(db: Connection, name: str, key: str, at: str) -> ApiKey:
    return stored.insert_key(db, hash_key(key), key[:PREFIX_LENGTH], name, at)


CACHE_TTL = 30.0
CACHE_MAX = 100_000


@attrs.define(eq=False)
class KeyRing:
    """Registers and authenticates keys against the store.

    Valid keys are cached in memory by hash for ``CACHE_TTL`` seconds, so a request
    costs no database read; the operator's revoke and rotate commands clear the cache
    of the running gateway through the admin socket, so they take effect at once.
    """

    store: Storage
    clock: Clock
    _cache: dict[str, tuple[ApiKey, float]] = attrs.Factory(dict)
    # One process (SQLite): a key is read on the event loop (``Store.peek``).
    peek: Callable[[Callable[[Connection], Any]], Any] | None = None

    def invalidate(self) -> None:
        self._cache.clear()

    async def invalidated(self) -> None:
        """The cluster's hook: another replica (or the CLI) revoked or rotated a key."""
        self.invalidate()

    async def register(self, name: str) -> tuple[ApiKey, str]:
        name = clean_name(name)
        key = mint_key()
        at = self.clock.now_iso()
        record = await self.store.write(lambda db: insert_key(db, name, key, at))
        return record, key

    async def authenticate(self, header: str | None) -> ApiKey:
        key = parse_bearer(header)
        digest = hash_key(key)
        now = self.clock.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        record = await self._lookup(digest)
        if record is None or record.revoked:
            raise InvalidApiKey("unknown or revoked API key")
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (record, now + CACHE_TTL)
        return record

    async def _lookup(self, digest: str) -> ApiKey | None:
        """The key with this hash: on the event loop where the store can peek (one
        SQLite process: a read by a unique index, microseconds), else in a thread."""
        if self.peek is not None:
            try:
                return cast(ApiKey | None, self.peek(lambda db: stored.key_by_hash(db, digest)))
            except Exception:  # SQLITE_BUSY during a WAL reset: read through a thread
                pass
        return await self.store.read(lambda db: stored.key_by_hash(db, digest))


# -- operator commands (synchronous, offline) ----------------------------------------


def list_keys(store: Storage) -> list[ApiKey]:
    return store.read_sync(stored.all_keys)


def find_by_prefix(db: Connection, prefix: str) -> ApiKey:
    """One key by its displayed prefix (or a longer part of it); ambiguity is refused."""
    if not prefix.startswith("rc_") or len(prefix) < 5:
        raise LookupError("give at least 'rc_' and two more characters of the key's prefix")
    matches = stored.keys_by_prefix(db, prefix)
    if not matches:
        raise LookupError(f"no key with prefix {prefix}")
    if len(matches) > 1:
        raise LookupError(f"prefix {prefix} is ambiguous ({len(matches)} keys): give more of it")
    return matches[0]


def revoke_key(store: Storage, prefix: str) -> ApiKey:
    def revoke(db: Connection) -> ApiKey:
        record = find_by_prefix(db, prefix)
        stored.revoke_key(db, record.id, Clock().now_iso())
        bump_epoch(db, KEYS_EPOCH)  # every replica drops its cached keys
        return attrs.evolve(record, revoked=True)

    return store.write_sync(revoke)


def rotate_key(store: Storage, prefix: str) -> tuple[ApiKey, str]:
    """A new secret for the same key id: balance, quota and history stay."""
    key = mint_key()

    def rotate(db: Connection) -> ApiKey:
        record = find_by_prefix(db, prefix)
        if record.revoked:
            raise LookupError(f"key {record.prefix} is revoked")
        stored.set_key_hash(db, record.id, hash_key(key), key[:PREFIX_LENGTH])
        bump_epoch(db, KEYS_EPOCH)
        return attrs.evolve(record, prefix=key[:PREFIX_LENGTH])

    return store.write_sync(rotate), key
