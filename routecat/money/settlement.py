"""Settlement: the money side of every finished job.

Invariants (admission, before the job, is ``admission.py``):
- Settlement runs exactly once per job (the ledger transaction ``job:<id>`` is
  idempotent): it releases the reservation, bills the verified usage at the rate of
  admission (``ceil`` once), pays the provider 95% (held for the probation period
  when the job was free) and the operator the rest, and records the audit row, all in
  one database transaction. It may take a balance below zero: a response is never
  cut off, so an overdraft is bounded by one admitted request.

What is billed, by outcome (DESIGN section 3's table, ``docs/billing.md``): done ->
verified usage; the client gone or a shutdown after the job was dispatched (sent to a
node that did not refuse it) -> the prompt and the delivered tokens; a streamed node
failure after output -> the prompt and the delivered tokens; a non-stream failure, or
any failure before the first token -> nothing, and a free request is given back.

If the settlement transaction fails (a store error), the bill is kept in memory and
retried with backoff by ``retry_settlements`` while the process stays up; nothing in
a settlement can stop the process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

import attrs
import trio

from ledger import book
from ledger.money import cost_msat, split
from ledger.store import Connection, Storage
from routecat.clock import Clock, iso
from routecat.config import Config
from routecat.db import jobs, quota
from routecat.db.jobs import JobRecord
from routecat.metrics import Metrics
from routecat.money.admission import Admission, Admissions
from routecat.money.earnings import Earnings
from routecat.money.usage import Verified, completion_bound, verify
from routecat.network.jobs import Bill, JobResult
from routecat.network.reputation import Reputation

log = logging.getLogger("routecat.settlement")

DAY = 86400.0
# A settlement write that has not begun by then is kept in memory and retried (a write
# the store has begun always completes: see ledger.store).
SETTLE_WRITE_TIMEOUT = 20.0


def billable(result: JobResult) -> bool:
    if result.outcome == "done":
        return True
    if result.outcome in ("client_gone", "shutdown"):
        # The client left (or the gateway stopped the job) after a node took it: the
        # prompt was processed, and whatever was delivered was delivered.
        return result.dispatched
    # A node failure: a stream keeps what it delivered (it got an error event); a
    # non-stream request answered 502 and the client got nothing.
    return result.delivered and result.spec.stream


def verified_usage(result: JobResult, bytes_per_token: float | None) -> Verified:
    spec = result.spec
    # The node's own count, when its done frame arrived (even if the client left just
    # after) and was valid; verified against the bounds like any report.
    reported = (
        result.reported if result.finish_reason is not None and not result.violation else None
    )
    return verify(
        reported,
        prompt_max=spec.prompt_bound,
        completion_max=completion_bound(spec.max_tokens, result.delivered_bytes, result.tool_calls),
        prompt_bytes=spec.prompt_bytes or spec.prompt_bound,
        delivered_bytes=result.delivered_bytes,
        bytes_per_token=bytes_per_token,
    )


def job_record(
    result: JobResult, usage: Verified, cost: int, provider_share: int, free: bool
) -> JobRecord:
    spec = result.spec
    reported = result.reported
    return JobRecord(
        id=spec.job_id,
        key_id=spec.key_id,
        node_id=result.node_id,
        model=spec.model,
        kind=spec.kind,
        stream=spec.stream,
        free=free,
        outcome=result.outcome,
        tokens_in=usage.prompt_tokens,
        tokens_out=usage.completion_tokens,
        reported_in=reported.prompt_tokens if reported else None,
        reported_out=reported.completion_tokens if reported else None,
        bytes_out=result.delivered_bytes,
        duration_ms=round(result.duration * 1000),
        ttft_ms=None if result.ttft is None else round(result.ttft * 1000),
        cost_msat=cost,
        provider_msat=provider_share,
        created_at=iso(result.started_at),
        finished_at=iso(result.started_at + result.duration),
    )


@attrs.define(eq=False)
class Settlement:
    store: Storage
    config: Config
    admissions: Admissions
    reputation: Reputation
    earnings: Earnings
    metrics: Metrics
    clock: Clock
    # Other live replicas sharing the database: their reservations are theirs to settle.
    alive_others: Callable[[], set[str]] = set
    settled: int = 0
    _unsettled: dict[str, Callable[[Connection], Bill]] = attrs.Factory(dict)
    _retry: trio.Event = attrs.Factory(trio.Event)

    async def settle(self, result: JobResult) -> Bill:
        """The scheduler's completion hook: decide the bill (pure), then commit it once.
        Never raises for a store error: the bill is kept and retried (see module doc)."""
        spec = result.spec
        admission = spec.admission
        assert isinstance(admission, Admission), "a job must be admitted before it runs"
        charge = billable(result)
        model = spec.model
        usage = verified_usage(result, self.reputation.bytes_per_token(model))
        if charge:
            cost = cost_msat(
                usage.prompt_tokens,
                usage.completion_tokens,
                admission.price.input_usd_per_1m,
                admission.price.output_usd_per_1m,
                admission.rate,
            )
        else:
            cost = 0
            usage = Verified(0, 0, usage.reported, False)
        bill = Bill(usage.prompt_tokens, usage.completion_tokens, cost)
        write = functools.partial(
            self._settle_write, result, usage, bill, charge, self.clock.wall()
        )
        failure: BaseException | None = None
        with trio.move_on_after(SETTLE_WRITE_TIMEOUT) as timer:
            try:
                bill = await self.store.write(write)
                self.admissions.settled(spec.job_id)
            except Exception as exc:
                failure = exc
        if timer.cancelled_caught:  # a stalled store: the write never began, so retry it
            failure = TimeoutError(f"the store did not commit within {SETTLE_WRITE_TIMEOUT:g}s")
        if failure is not None:
            self.metrics.settlement_retries.inc()
            log.error(
                "settling job %s failed (%s); the bill is kept and retried",
                spec.job_id,
                type(failure).__name__,
                exc_info=failure,
            )
            self._unsettled[spec.job_id] = write
            self.metrics.settlements_pending.set(len(self._unsettled))
            self._retry.set()
        self._settled_job(result, usage, bill, charge)
        return bill

    def _settle_write(
        self,
        result: JobResult,
        usage: Verified,
        bill: Bill,
        charge: bool,
        now: float,
        db: Connection,
    ) -> Bill:
        """The settlement transaction: idempotent on the job id."""
        spec = result.spec
        admission = spec.admission
        assert isinstance(admission, Admission)
        key = f"job:{spec.job_id}"
        if book.transaction_exists(db, key):
            done = jobs.billed(db, spec.job_id)
            return Bill(0, 0, 0) if done is None else Bill(*attrs.astuple(done))
        book.release(db, spec.job_id)
        payer = book.SUBSIDY if admission.free else book.user_account(spec.key_id)
        provider = book.provider_account(result.node_id) if result.node_id else book.OPERATOR_FEE
        tx = book.post_job(
            db,
            key,
            payer,
            provider,
            bill.cost_msat,
            memo=f"{spec.model} {usage.prompt_tokens}+{usage.completion_tokens} tokens",
        )
        assert tx is not None
        provider_share, _ = split(bill.cost_msat)
        if admission.free:
            if provider_share and result.node_id:
                book.hold(db, tx, provider, provider_share, now + self.config.probation_days * DAY)
            quota.add_subsidy_spent(db, admission.day, bill.cost_msat)
            # A free request that was not served (nothing billed) keeps its quota.
            quota.settle_claim(db, spec.job_id, give_back=not charge)
        if charge:
            jobs.insert_job(
                db, job_record(result, usage, bill.cost_msat, provider_share, admission.free)
            )
        return bill

    def _settled_job(self, result: JobResult, usage: Verified, bill: Bill, charge: bool) -> None:
        """Counters and reputation after a settlement (committed or kept for retry)."""
        spec = result.spec
        model = spec.model
        self.settled += 1
        self.metrics.settlements.inc()
        if charge:
            self.metrics.tokens.labels(model, "in").inc(max(0, bill.prompt_tokens))
            self.metrics.tokens.labels(model, "out").inc(max(0, bill.completion_tokens))
        if result.outcome == "done":
            why = self.reputation.observe(
                result.node_id,
                model,
                None if result.violation else result.reported,
                result.delivered_bytes,
                usage.capped,
                prompt_bytes=spec.prompt_bytes,
                prompt_allowance=spec.prompt_bound - spec.prompt_bytes,
                violation=result.violation,
            )
            if why:
                log.warning(
                    "node %s lost reputation: %s (job %s)", result.node_id, why, spec.job_id
                )
        if result.node_id and charge:
            self.earnings.changed(result.node_id)

    async def retry_settlements(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit the bills whose settlement failed, with exponential backoff."""
        task_status.started()
        delay = 0.5
        while True:
            await self._retry.wait()
            await trio.sleep(delay)
            for job_id, write in list(self._unsettled.items()):
                try:
                    await self.store.write(write)
                except Exception as exc:
                    log.warning("settlement of job %s still failing: %r", job_id, exc)
                    continue
                del self._unsettled[job_id]
                self.admissions.settled(job_id)
                log.info("settlement of job %s committed after a retry", job_id)
            self.metrics.settlements_pending.set(len(self._unsettled))
            if self._unsettled:
                delay = min(delay * 2, 60.0)
            else:
                delay = 0.5
                self._retry = trio.Event()

    async def sweep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release reservations left by a crash (at start, all but those of other live
        replicas), then, periodically, any that no admitted request of this process holds
        (``open_reservations``: queued, running, or settling) and no other live replica
        holds (a dead replica's are released here, by the survivors)."""
        spare = self.alive_others()
        released = await self.store.write(
            lambda db: sweep_and_give_back(db, float("inf"), spare=spare)
        )
        if released:
            log.warning("released %d reservations left by an earlier run", len(released))
        task_status.started()
        while True:
            await trio.sleep(self.config.sweep_interval)
            try:
                stale = await self.store.write(
                    functools.partial(
                        sweep_and_give_back,
                        older_than=self.clock.wall() - self.config.sweep_interval,
                        keep=set(self.admissions.open_reservations),
                        spare=self.alive_others(),
                    )
                )
            except Exception as exc:  # the store briefly failing: the next round retries
                log.error("reservation sweep failed: %r", exc)
                continue
            if stale:
                log.warning("released %d stale reservations", len(stale))


def sweep_and_give_back(
    db: Connection, older_than: float, keep: Iterable[str] = (), spare: Iterable[str] = ()
) -> list[str]:
    """Release orphaned reservations (``book.sweep_reservations``) and give back the free
    requests their jobs claimed: a job that never settled billed nothing (DESIGN
    section 3, the crash row)."""
    released = book.sweep_reservations(db, older_than, keep, spare)
    for job_id in released:
        quota.settle_claim(db, job_id, give_back=True)
    return released


def credit(db: Connection, key_id: int, amount_msat: int, memo: str, key: str) -> bool:
    """An operator's credit to a key, from operator equity (audited: kind ``credit``)."""
    if amount_msat <= 0:
        raise ValueError("a credit must be positive")
    tx = book.post(
        db,
        key,
        "credit",
        [
            book.Posting(book.user_account(key_id), amount_msat),
            book.Posting(book.OPERATOR_EQUITY, -amount_msat),
        ],
        memo=memo,
    )
    return tx is not None
