"""The audit trail: one row per billed job, written in its settlement transaction."""

from __future__ import annotations

import attrs

from ledger.store import Connection, rows


@attrs.frozen
class JobRecord:
    id: str
    key_id: int
    node_id: str | None
    model: str
    kind: str
    stream: bool
    free: bool
    outcome: str
    tokens_in: int
    tokens_out: int
    reported_in: int | None
    reported_out: int | None
    bytes_out: int
    duration_ms: int
    ttft_ms: int | None
    cost_msat: int
    provider_msat: int
    created_at: str
    finished_at: str


def insert_job(db: Connection, job: JobRecord) -> None:
    """Record a job once (a replayed settlement changes nothing)."""
    db.execute(
        "INSERT INTO jobs (id, key_id, node_id, model, kind, stream, free, outcome, tokens_in,"
        " tokens_out, reported_in, reported_out, bytes_out, duration_ms, ttft_ms, cost_msat,"
        " provider_msat, created_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO NOTHING",
        (
            job.id,
            job.key_id,
            job.node_id,
            job.model,
            job.kind,
            int(job.stream),
            int(job.free),
            job.outcome,
            job.tokens_in,
            job.tokens_out,
            job.reported_in,
            job.reported_out,
            job.bytes_out,
            job.duration_ms,
            job.ttft_ms,
            job.cost_msat,
            job.provider_msat,
            job.created_at,
            job.finished_at,
        ),
    )


@attrs.frozen
class Billed:
    tokens_in: int
    tokens_out: int
    cost_msat: int


def billed(db: Connection, job_id: str) -> Billed | None:
    row = db.execute(
        "SELECT tokens_in, tokens_out, cost_msat FROM jobs WHERE id = ?", (job_id,)
    ).fetchone()
    return None if row is None else Billed(int(row[0]), int(row[1]), int(row[2]))


@attrs.frozen
class AuditEntry:
    id: str
    model: str
    tokens_in: int
    tokens_out: int
    duration_ms: int
    cost_msat: int
    finished_at: str


def audit_page(db: Connection, page: int, per_page: int) -> tuple[list[AuditEntry], int]:
    """One page of billed jobs, newest first, and how many there are in all."""
    total = int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    found = rows(
        db,
        "SELECT id, model, tokens_in, tokens_out, duration_ms, cost_msat, finished_at FROM jobs"
        " ORDER BY finished_at DESC, id DESC LIMIT ? OFFSET ?",
        (per_page, (page - 1) * per_page),
    )
    return [
        AuditEntry(
            r["id"],
            r["model"],
            int(r["tokens_in"]),
            int(r["tokens_out"]),
            int(r["duration_ms"]),
            int(r["cost_msat"]),
            r["finished_at"],
        )
        for r in found
    ], total


@attrs.frozen
class Activity:
    jobs: int
    tokens: int


def activity_since(db: Connection, since: str) -> Activity:
    """Jobs and tokens billed since the ISO time ``since``."""
    row = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(tokens_in + tokens_out), 0) FROM jobs"
        " WHERE finished_at >= ?",
        (since,),
    ).fetchone()
    return Activity(int(row[0]), int(row[1]))


def activity_by_bucket(db: Connection, since: str, width: int) -> dict[str, Activity]:
    """Jobs and tokens since ``since``, grouped by the first ``width`` characters of the
    ISO finish time (13: hours, 10: days)."""
    if width not in (10, 13):
        raise ValueError("buckets are days (10) or hours (13)")
    return {
        r[0]: Activity(int(r[1]), int(r[2]))
        for r in rows(
            db,
            "SELECT substr(finished_at, 1, ?) AS b, COUNT(*),"
            " COALESCE(SUM(tokens_in + tokens_out), 0) FROM jobs WHERE finished_at >= ?"
            " GROUP BY b",
            (width, since),
        )
    }


@attrs.frozen
class NodeTotals:
    jobs: int
    tokens_in: int
    tokens_out: int
    provider_msat: int


def node_totals(db: Connection, node_id: str) -> NodeTotals:
    row = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0),"
        " COALESCE(SUM(provider_msat), 0) FROM jobs WHERE node_id = ?",
        (node_id,),
    ).fetchone()
    return NodeTotals(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


@attrs.frozen
class NodeJob:
    id: str
    model: str
    tokens_in: int
    tokens_out: int
    duration_ms: int
    provider_msat: int
    free: bool
    finished_at: str


def node_jobs(db: Connection, node_id: str, limit: int) -> list[NodeJob]:
    return [
        NodeJob(
            r["id"],
            r["model"],
            int(r["tokens_in"]),
            int(r["tokens_out"]),
            int(r["duration_ms"]),
            int(r["provider_msat"]),
            bool(r["free"]),
            r["finished_at"],
        )
        for r in rows(
            db,
            "SELECT id, model, tokens_in, tokens_out, duration_ms, provider_msat, free,"
            " finished_at FROM jobs WHERE node_id = ? ORDER BY finished_at DESC LIMIT ?",
            (node_id, limit),
        )
    ]


@attrs.frozen
class KeyJob:
    """One billed job as its key's owner sees it (``GET /v1/auth/usage``)."""

    id: str
    model: str
    kind: str
    free: bool
    tokens_in: int
    tokens_out: int
    cost_msat: int
    finished_at: str


def key_jobs(db: Connection, key_id: int, page: int, per_page: int) -> tuple[list[KeyJob], int]:
    """One page of a key's billed jobs, newest first, and how many it has in all."""
    total = int(db.execute("SELECT COUNT(*) FROM jobs WHERE key_id = ?", (key_id,)).fetchone()[0])
    found = rows(
        db,
        "SELECT id, model, kind, free, tokens_in, tokens_out, cost_msat, finished_at FROM jobs"
        " WHERE key_id = ? ORDER BY finished_at DESC, id DESC LIMIT ? OFFSET ?",
        (key_id, per_page, (page - 1) * per_page),
    )
    return [
        KeyJob(
            r["id"],
            r["model"],
            r["kind"],
            bool(r["free"]),
            int(r["tokens_in"]),
            int(r["tokens_out"]),
            int(r["cost_msat"]),
            r["finished_at"],
        )
        for r in found
    ], total
