"""Admission and settlement: the money side of every request.

Invariants:
- Admission reserves before the job starts: a free request takes one of the key's
  daily free requests and reserves its maximum cost against the daily subsidy budget;
  a paid request is admitted only if ``balance - reserved > 0`` (checked and reserved
  atomically) and reserves its estimated maximum cost. Nothing is admitted without a
  BTC/USD rate (never priced at 0).
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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal

import attrs
import trio

from ledger import book
from ledger.money import cost_msat, split
from ledger.store import Connection, Store
from owlrun.protocol import Earnings
from routecat.config import Config
from routecat.db import jobs, payouts, quota
from routecat.db.jobs import JobRecord
from routecat.errors import InsufficientBalance, ServiceUnavailable
from routecat.metrics import Metrics
from routecat.network.jobs import Bill, JobResult, JobSpec
from routecat.network.link import NodeLink
from routecat.network.registry import Registry
from routecat.network.reputation import Reputation
from routecat.pricing import Catalog, Price, RateFeed
from routecat.usage import Verified, completion_bound, verify

log = logging.getLogger("routecat.billing")

DAY = 86400.0
# A settlement write that has not begun by then is kept in memory and retried (a write
# the store has begun always completes: see ledger.store).
SETTLE_WRITE_TIMEOUT = 20.0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


@attrs.frozen
class Admission:
    free: bool
    rate: Decimal
    price: Price
    reserved_msat: int
    day: str


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
class Billing:
    store: Store
    config: Config
    catalog: Catalog
    rates: RateFeed
    registry: Registry
    reputation: Reputation
    metrics: Metrics
    wall: Callable[[], float] = time.time
    settled: int = 0
    # Jobs admitted by this process whose reservation is still open (queued or running):
    # the sweeper never releases these.
    open_reservations: set[str] = attrs.Factory(set)
    _dirty_nodes: set[str] = attrs.Factory(set)
    _unsettled: dict[str, Callable[[Connection], Bill]] = attrs.Factory(dict)
    _retry: trio.Event = attrs.Factory(trio.Event)

    # -- admission --

    def max_cost(self, spec: JobSpec, price: Price, rate: Decimal) -> int:
        return cost_msat(
            spec.prompt_bound,
            spec.max_tokens + 1,
            price.input_usd_per_1m,
            price.output_usd_per_1m,
            rate,
        )

    def applied_max_tokens(self, model: str, requested: int | None) -> int:
        cap = self.catalog.price(model).max_tokens or self.config.default_max_tokens
        return min(requested, cap) if requested is not None else cap

    async def admit(self, spec: JobSpec) -> JobSpec:
        price = self.catalog.price(spec.model)
        now = self.wall()
        day = utc_day(now)
        last = self.rates.last_rate()
        if last is None:
            raise ServiceUnavailable(
                "no BTC/USD rate is known yet: requests cannot be priced",
                code="pricing_unavailable",
                retry_after=30,
            )
        free_spec = spec
        if spec.max_tokens > self.config.free_max_tokens:
            # A free request's max_tokens is capped at the free cap (clients such as
            # OpenCode always ask for a large one); the response says it was free.
            limit = self.config.free_max_tokens
            free_spec = attrs.evolve(
                spec, max_tokens=limit, request={**spec.request, "max_tokens": limit}
            )
        why_not_free = "the model is not in this gateway's free catalog"
        if self.catalog.listed(spec.model):
            reserve = self.max_cost(free_spec, price, last)
            budget = self.config.free_daily_budget_sats * 1000

            def take_free(db: Connection) -> str | None:
                if quota.free_used(db, spec.key_id, day) >= self.config.free_daily_requests:
                    return (
                        f"the key's {self.config.free_daily_requests} free requests for today"
                        " are used (they reset at midnight UTC)"
                    )
                _, reserved = book.balance(db, book.SUBSIDY)
                if quota.subsidy_spent(db, day) + reserved + reserve > budget:
                    return "the gateway's free budget for today is spent"
                quota.take_free_request(db, spec.key_id, day)
                book.reserve_unconditionally(db, spec.job_id, book.SUBSIDY, reserve, now)
                return None

            refused = await self.store.write(take_free)
            if refused is None:
                self.open_reservations.add(spec.job_id)
                return attrs.evolve(free_spec, admission=Admission(True, last, price, reserve, day))
            why_not_free = refused
        rate = self.rates.fresh_rate()
        if rate is None:
            raise ServiceUnavailable(
                "the BTC/USD rate is too old to price a paid request",
                code="pricing_unavailable",
                retry_after=60,
            )
        reserve = self.max_cost(spec, price, rate)
        account = book.user_account(spec.key_id)

        if await self.store.write(lambda db: book.reserve(db, spec.job_id, account, reserve, now)):
            self.open_reservations.add(spec.job_id)
        else:
            raise InsufficientBalance(
                f"insufficient balance, and this request cannot be free: {why_not_free};"
                " top up with POST /v1/auth/topup"
            )
        return attrs.evolve(spec, admission=Admission(False, rate, price, reserve, day))

    async def release(self, spec: JobSpec) -> None:
        """Undo an admission whose job never started (no node, shutting down)."""
        admission = spec.admission
        if not isinstance(admission, Admission):
            return

        def undo(db: Connection) -> None:
            if book.release(db, spec.job_id) and admission.free:
                quota.give_back_free_request(db, spec.key_id, admission.day)

        await self.store.write(undo)
        self.open_reservations.discard(spec.job_id)

    # -- settlement (the scheduler's completion hook) --

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
        write = functools.partial(self._settle_write, result, usage, bill, charge, self.wall())
        failure: BaseException | None = None
        with trio.move_on_after(SETTLE_WRITE_TIMEOUT) as timer:
            try:
                bill = await self.store.write(write)
                self.open_reservations.discard(spec.job_id)
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
            if not charge:
                # A free request that was not served (nothing billed) keeps its quota.
                quota.give_back_free_request(db, spec.key_id, admission.day)
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
            self._dirty_nodes.add(result.node_id)

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
                self.open_reservations.discard(job_id)
                log.info("settlement of job %s committed after a retry", job_id)
            self.metrics.settlements_pending.set(len(self._unsettled))
            if self._unsettled:
                delay = min(delay * 2, 60.0)
            else:
                delay = 0.5
                self._retry = trio.Event()

    # -- reads --

    async def balance(self, key_id: int) -> dict[str, int]:
        day = utc_day(self.wall())

        def read(db: Connection) -> tuple[int, int]:
            balance, _ = book.balance(db, book.user_account(key_id))
            return balance, quota.free_used(db, key_id, day)

        balance_msat, used = await self.store.read(read)
        return {
            "balance_sats": balance_msat // 1000,
            "balance_msat": balance_msat,
            "free_remaining": max(0, self.config.free_daily_requests - used),
        }

    async def earnings(self, node_id: str) -> dict[str, int]:
        account = book.provider_account(node_id)
        now = self.wall()

        def read(db: Connection) -> dict[str, int]:
            balance, _ = book.balance(db, account)
            held = book.held(db, account, now)
            sent = payouts.totals(db, node_id)
            return {
                "earned_msat": book.earned(db, account, "job"),
                "held_msat": held,
                "payable_msat": max(0, balance - held),
                "balance_msat": balance,
                "paid_msat": sent.paid_msat,
                "pending_msat": sent.pending_msat,
            }

        return await self.store.read(read)

    # -- services --

    def mark_dirty(self, node: NodeLink) -> None:
        self._dirty_nodes.add(node.id)

    async def publish_earnings(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every few seconds, tell nodes whose money moved what they have earned."""
        task_status.started()
        while True:
            await trio.sleep(2)
            dirty, self._dirty_nodes = self._dirty_nodes, set()
            for node_id in dirty:
                node = self.registry.nodes.get(node_id)
                if node is None:
                    continue
                try:
                    e = await self.earnings(node_id)
                except Exception as exc:  # the store briefly failing: told next time
                    log.warning("earnings of node %s not read: %r", node_id, exc)
                    self._dirty_nodes.add(node_id)
                    continue
                node.send_nowait(
                    Earnings(
                        earned_msat=e["earned_msat"],
                        held_msat=e["held_msat"],
                        payable_msat=e["payable_msat"],
                        paid_msat=e["paid_msat"],
                        pending_msat=e["pending_msat"],
                        threshold_sats=node.payout_threshold_sats,
                    )
                )

    async def sweep(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release reservations left by a crash (all of them at start), then, periodically,
        any that no admitted request of this process holds (``open_reservations``: queued,
        running, or settling)."""
        released = await self.store.write(lambda db: book.sweep_reservations(db, float("inf")))
        if released:
            log.warning("released %d reservations left by an earlier run", len(released))
        task_status.started()
        while True:
            await trio.sleep(self.config.sweep_interval)
            try:
                stale = await self.store.write(
                    functools.partial(
                        book.sweep_reservations,
                        older_than=self.wall() - self.config.sweep_interval,
                        keep=set(self.open_reservations),
                    )
                )
            except Exception as exc:  # the store briefly failing: the next round retries
                log.error("reservation sweep failed: %r", exc)
                continue
            if stale:
                log.warning("released %d stale reservations", len(stale))


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
