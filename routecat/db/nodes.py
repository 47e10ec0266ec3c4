"""Nodes as stored (identity, payout settings, bans) and the models the network has seen."""

from __future__ import annotations

import json
from collections.abc import Iterable

import attrs

from ledger.store import Connection, Row, rows


@attrs.frozen
class NodeRecord:
    id: str
    secret_hash: str
    name: str
    payout_address: str
    payout_threshold_sats: int | None
    created_at: str
    last_seen_at: str
    banned_at: str | None
    ban_reason: str | None


def _node(row: Row) -> NodeRecord:
    threshold = row["payout_threshold_sats"]
    return NodeRecord(
        id=row["id"],
        secret_hash=row["secret_hash"],
        name=row["name"],
        payout_address=row["payout_address"],
        payout_threshold_sats=None if threshold is None else int(threshold),
        created_at=row["created_at"],
        last_seen_at=row["last_seen_at"],
        banned_at=row["banned_at"],
        ban_reason=row["ban_reason"],
    )


def node(db: Connection, node_id: str) -> NodeRecord | None:
    row = db.execute("SELECT * FROM nodes WHERE id = ?", (node_id,)).fetchone()
    return None if row is None else _node(row)


def insert_node(
    db: Connection,
    node_id: str,
    secret_hash: str,
    name: str,
    payout_address: str,
    payout_threshold_sats: int | None,
    at: str,
) -> None:
    db.execute(
        "INSERT INTO nodes (id, secret_hash, name, payout_address, payout_threshold_sats,"
        " created_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (node_id, secret_hash, name, payout_address, payout_threshold_sats, at, at),
    )


def update_node(
    db: Connection,
    node_id: str,
    name: str,
    payout_address: str,
    payout_threshold_sats: int | None,
    at: str,
) -> None:
    db.execute(
        "UPDATE nodes SET name = ?, payout_address = ?, payout_threshold_sats = ?,"
        " last_seen_at = ? WHERE id = ?",
        (name, payout_address, payout_threshold_sats, at, node_id),
    )


def ban_node(db: Connection, node_id: str, reason: str, at: str) -> bool:
    """False if no node with that id ever connected."""
    cursor = db.execute(
        "UPDATE nodes SET banned_at = ?, ban_reason = ? WHERE id = ?", (at, reason, node_id)
    )
    return cursor.rowcount > 0


def payout_targets(db: Connection) -> list[NodeRecord]:
    """Nodes that gave a payout address and are not banned."""
    return [
        _node(r)
        for r in rows(db, "SELECT * FROM nodes WHERE payout_address != '' AND banned_at IS NULL")
    ]


def models_seen(db: Connection) -> dict[str, float]:
    return {r[0]: float(r[1]) for r in rows(db, "SELECT model, last_seen FROM models_seen")}


def remember_models(db: Connection, names: Iterable[str], at: float) -> None:
    for name in names:
        db.execute(
            "INSERT INTO models_seen (model, last_seen) VALUES (?, ?)"
            " ON CONFLICT(model) DO UPDATE SET last_seen = excluded.last_seen",
            (name, at),
        )


def banned_among(db: Connection, node_ids: Iterable[str]) -> list[str]:
    """Which of ``node_ids`` are banned."""
    wanted = list(node_ids)
    return [
        r[0] for r in rows(db, "SELECT id FROM nodes WHERE banned_at IS NOT NULL") if r[0] in wanted
    ]


@attrs.frozen
class StockRegistration:
    """What a stock Go Owlrun agent said when it last registered (any replica)."""

    node_id: str
    models: tuple[str, ...]
    version: str
    threshold_sats: int


def put_stock_registration(
    db: Connection, key_hash: str, registration: StockRegistration, at: float
) -> None:
    db.execute(
        "INSERT INTO stock_registrations (key_hash, node_id, models, version, threshold_sats,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key_hash) DO UPDATE SET"
        " node_id = excluded.node_id, models = excluded.models, version = excluded.version,"
        " threshold_sats = excluded.threshold_sats, updated_at = excluded.updated_at",
        (
            key_hash,
            registration.node_id,
            json.dumps(list(registration.models)),
            registration.version,
            registration.threshold_sats,
            at,
        ),
    )


def stock_version(db: Connection, node_id: str) -> str | None:
    """The agent version a stock agent last registered this node with; None: a native node
    (it never registered as a stock agent)."""
    row = db.execute(
        "SELECT version FROM stock_registrations WHERE node_id = ?"
        " ORDER BY updated_at DESC LIMIT 1",
        (node_id,),
    ).fetchone()
    return None if row is None else str(row[0])


def stock_registration(db: Connection, key_hash: str) -> StockRegistration | None:
    row = db.execute(
        "SELECT node_id, models, version, threshold_sats FROM stock_registrations"
        " WHERE key_hash = ?",
        (key_hash,),
    ).fetchone()
    if row is None:
        return None
    models = json.loads(row[1])
    return StockRegistration(
        row[0],
        tuple(m for m in models if isinstance(m, str)) if isinstance(models, list) else (),
        row[2],
        int(row[3]),
    )
