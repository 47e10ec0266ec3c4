"""What replicas sharing one database tell each other: who is alive, which nodes each
holds, who holds a lease, which caches went stale, and the shared rate-limit hits.

With one SQLite process the same tables hold just that process; nothing here depends
on there being several."""

from __future__ import annotations

import json
from collections.abc import Iterable

import attrs

from ledger.store import Connection, rows


@attrs.frozen
class Replica:
    id: str
    url: str
    started_at: float
    seen_at: float


def beat(db: Connection, replica_id: str, url: str, now: float) -> None:
    """Record that ``replica_id`` (reachable at ``url``) is alive at ``now``."""
    db.execute(
        "INSERT INTO replicas (id, url, started_at, seen_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(id) DO UPDATE SET url = excluded.url, seen_at = excluded.seen_at",
        (replica_id, url, now, now),
    )


def replicas(db: Connection, seen_since: float) -> list[Replica]:
    return [
        Replica(r["id"], r["url"], float(r["started_at"]), float(r["seen_at"]))
        for r in rows(db, "SELECT * FROM replicas WHERE seen_at >= ?", (seen_since,))
    ]


def forget_replica(db: Connection, replica_id: str) -> None:
    """A replica that stops cleanly: its row and its nodes leave the directory."""
    db.execute("DELETE FROM node_directory WHERE replica_id = ?", (replica_id,))
    db.execute("DELETE FROM replicas WHERE id = ?", (replica_id,))


def forget_stale(db: Connection, seen_before: float) -> None:
    """Replicas (and their directory entries) silent since before ``seen_before``."""
    db.execute("DELETE FROM node_directory WHERE seen_at < ?", (seen_before,))
    db.execute("DELETE FROM replicas WHERE seen_at < ?", (seen_before,))


@attrs.frozen
class DirectoryEntry:
    """A node as the replica holding its socket last published it."""

    node_id: str
    replica_id: str
    models: tuple[str, ...]
    capacity: int
    in_flight: int
    seen_at: float
    # model -> context length the node reported (models without one are absent)
    contexts: dict[str, int] = attrs.field(factory=dict, eq=False)
    embedding: frozenset[str] = attrs.field(factory=frozenset, eq=False)  # embedding models


def publish_nodes(
    db: Connection, replica_id: str, entries: Iterable[DirectoryEntry], now: float
) -> None:
    """Replace what ``replica_id`` holds in the directory with ``entries``."""
    db.execute("DELETE FROM node_directory WHERE replica_id = ?", (replica_id,))
    for e in entries:
        db.execute(
            "INSERT INTO node_directory (node_id, replica_id, models, capacity, in_flight,"
            " seen_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET"
            " replica_id = excluded.replica_id, models = excluded.models,"
            " capacity = excluded.capacity, in_flight = excluded.in_flight,"
            " seen_at = excluded.seen_at",
            (
                e.node_id,
                replica_id,
                json.dumps(
                    [
                        {
                            "name": m,
                            "context_length": e.contexts.get(m),
                            "embedding": m in e.embedding,
                        }
                        for m in e.models
                    ]
                ),
                e.capacity,
                e.in_flight,
                now,
            ),
        )


def directory(db: Connection, seen_since: float) -> list[DirectoryEntry]:
    out = []
    for r in rows(db, "SELECT * FROM node_directory WHERE seen_at >= ?", (seen_since,)):
        found = json.loads(r["models"])
        names: list[str] = []
        contexts: dict[str, int] = {}
        embedding: set[str] = set()
        for m in found if isinstance(found, list) else ():
            name = m.get("name") if isinstance(m, dict) else m
            if not isinstance(name, str):
                continue
            names.append(name)
            length = m.get("context_length") if isinstance(m, dict) else None
            if isinstance(length, int) and not isinstance(length, bool) and length > 0:
                contexts[name] = length
            if isinstance(m, dict) and m.get("embedding") is True:
                embedding.add(name)
        out.append(
            DirectoryEntry(
                r["node_id"],
                r["replica_id"],
                tuple(names),
                int(r["capacity"]),
                int(r["in_flight"]),
                float(r["seen_at"]),
                contexts,
                frozenset(embedding),
            )
        )
    return out


def take_lease(db: Connection, name: str, holder: str, now: float, ttl: float) -> bool:
    """Take or renew the lease ``name`` for ``holder`` until ``now + ttl``; False while
    another holder's lease runs."""
    db.execute(
        "INSERT INTO leases (name, holder, until) VALUES (?, ?, ?)"
        " ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, until = excluded.until"
        " WHERE leases.holder = excluded.holder OR leases.until < ?",
        (name, holder, now + ttl, now),
    )
    found = db.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
    return found is not None and found[0] == holder


def drop_lease(db: Connection, name: str, holder: str) -> None:
    db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))


def bump_epoch(db: Connection, name: str) -> None:
    """Say that what every replica caches under ``name`` changed (a key revoked...)."""
    db.execute(
        "INSERT INTO epochs (name, value) VALUES (?, 1)"
        " ON CONFLICT(name) DO UPDATE SET value = epochs.value + 1",
        (name,),
    )


def epochs(db: Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in rows(db, "SELECT name, value FROM epochs")}


def hit(db: Connection, bucket: str, now: float, window: float, limit: int) -> float | None:
    """Count one hit of ``bucket`` if fewer than ``limit`` fell in the last ``window``
    seconds (across every replica); else the seconds until one slot frees."""
    db.execute("DELETE FROM rate_hits WHERE bucket = ? AND at <= ?", (bucket, now - window))
    found = db.execute(
        "SELECT COUNT(*), MIN(at) FROM rate_hits WHERE bucket = ?", (bucket,)
    ).fetchone()
    if int(found[0]) >= limit:
        return window if found[1] is None else float(found[1]) + window - now
    db.execute("INSERT INTO rate_hits (bucket, at) VALUES (?, ?)", (bucket, now))
    return None


def prune_hits(db: Connection, before: float) -> None:
    """Forget rate-limit hits older than any window (idle buckets' last hits)."""
    db.execute("DELETE FROM rate_hits WHERE at < ?", (before,))
