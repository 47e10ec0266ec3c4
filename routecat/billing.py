"""The completion hook: what a finished job costs, recorded exactly once.

Invariant: ``settle`` is idempotent on the job id (the job row is inserted with
``ON CONFLICT DO NOTHING`` in the same transaction as anything else it writes), and
the usage it returns is the usage billed: verified against the bounds in
``routecat.usage``, never the node's word alone.

What is billed, by outcome: done -> verified usage; client gone, shutdown, or a
streamed node failure after output -> the prompt and the delivered tokens; a
non-stream failure, or any failure before the first token -> nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import attrs
import sqlite_utils

from ledger.store import Store
from routecat.scheduler import Bill, JobResult, JobSpec
from routecat.usage import Verified, verify

log = logging.getLogger("routecat.billing")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def billable(result: JobResult) -> bool:
    if result.outcome == "done":
        return True
    if not result.delivered:
        return False
    # Output was delivered: streamed failures, disconnects and shutdowns bill it;
    # a non-stream failure returned 502 and the client got nothing.
    return result.spec.stream or result.outcome in ("client_gone", "shutdown")


def verified_usage(result: JobResult, bytes_per_token: float | None) -> Verified:
    spec = result.spec
    from routecat.usage import completion_bound

    reported = result.reported if result.outcome == "done" else None
    return verify(
        reported,
        prompt_max=spec.prompt_bound,
        completion_max=completion_bound(spec.max_tokens, result.delivered_bytes),
        prompt_bytes=spec.prompt_bound,
        delivered_bytes=result.delivered_bytes,
        bytes_per_token=bytes_per_token,
    )


def record_job(
    db: sqlite_utils.Database,
    result: JobResult,
    usage: Verified,
    cost_msat: int,
    provider_msat: int,
    free: bool,
) -> bool:
    """Insert the job's audit row; False if it was already recorded (settled before)."""
    spec = result.spec
    reported = result.reported
    cursor = db.conn.execute(
        "INSERT INTO jobs (id, key_id, node_id, model, kind, stream, free, outcome, tokens_in,"
        " tokens_out, reported_in, reported_out, bytes_out, duration_ms, ttft_ms, cost_msat,"
        " provider_msat, created_at, finished_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT(id) DO NOTHING",
        (
            spec.job_id,
            spec.key_id,
            result.node_id,
            spec.model,
            spec.kind,
            int(spec.stream),
            int(free),
            result.outcome,
            usage.prompt_tokens,
            usage.completion_tokens,
            reported.prompt_tokens if reported else None,
            reported.completion_tokens if reported else None,
            result.delivered_bytes,
            round(result.duration * 1000),
            None if result.ttft is None else round(result.ttft * 1000),
            cost_msat,
            provider_msat,
            iso(result.started_at),
            iso(result.started_at + result.duration),
        ),
    )
    return cursor.rowcount == 1


@attrs.define(eq=False)
class Billing:
    store: Store
    settled: int = 0

    async def admit(self, spec: JobSpec) -> JobSpec:
        return spec

    async def release(self, spec: JobSpec) -> None:
        return None

    async def settle(self, result: JobResult) -> Bill:
        if not billable(result):
            return Bill(0, 0, 0)
        usage = verified_usage(result, None)

        def write(db: sqlite_utils.Database) -> Any:
            return record_job(db, result, usage, 0, 0, False)

        await self.store.write(write)
        self.settled += 1
        return Bill(usage.prompt_tokens, usage.completion_tokens, 0)
