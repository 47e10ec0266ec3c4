"""Providers' earnings: what each node earned, holds, may be paid, was paid; and the
service that tells connected nodes when their money moved.

Invariant: the figures come from the ledger and the payouts table in one read
transaction, so they always add up (``earned = balance + paid + pending`` and
``payable = balance - held``)."""

from __future__ import annotations

import logging

import attrs
import trio

from ledger import book
from ledger.store import Connection, Storage
from owlrun.protocol import Earnings as EarningsFrame
from routecat.clock import Clock, rfc3339
from routecat.db import payouts
from routecat.network.link import NodeLink
from routecat.network.registry import Registry

log = logging.getLogger("routecat.earnings")

# Nodes whose earnings one read transaction gathers: one trip to the store's thread for
# many nodes, without holding a read open for thousands.
PUBLISH_BATCH = 200


@attrs.define(eq=False)
class Earnings:
    store: Storage
    registry: Registry
    clock: Clock
    _dirty_nodes: set[str] = attrs.Factory(set)

    async def of(self, node_id: str) -> dict[str, int]:
        return (await self.of_many([node_id]))[node_id]

    async def of_many(self, node_ids: list[str]) -> dict[str, dict[str, int]]:
        """Several nodes' earnings in one read transaction (one trip to the store's
        thread, however many nodes: thousands reconnect at once after a restart)."""
        now = self.clock.wall()

        def one(db: Connection, node_id: str) -> dict[str, int]:
            account = book.provider_account(node_id)
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

        def read(db: Connection) -> dict[str, dict[str, int]]:
            return {node_id: one(db, node_id) for node_id in node_ids}

        return await self.store.read(read)

    async def stock_ack(self, node_id: str) -> dict[str, object]:
        """A stock Go agent's ``heartbeat_ack``: what it earned and its last payouts, in
        the Go agent's fields and types (integers where it reads integers: a float there
        makes it drop the socket). ``balance_sats`` stays 0: a positive one makes the
        agent ask for an ecash withdrawal, which this gateway does not offer; its money
        goes to its Lightning Address instead."""
        figures = await self.of(node_id)

        def read(db: Connection) -> list[payouts.PayoutRecord]:
            return payouts.recent(db, limit=10, node_id=node_id)

        history = [
            {
                "amount_sats": p.amount_msat // 1000,
                "payment_hash": p.payment_hash or "",
                "timestamp": rfc3339(p.updated_at),
            }
            for p in await self.store.read(read)
            if p.state == "paid"
        ]
        return {
            "type": "heartbeat_ack",
            "status": "ok",
            "earned_total_sats": figures["earned_msat"] // 1000,
            "balance_sats": 0,
            "withdraw_history": history,
        }

    def mark_dirty(self, node: NodeLink) -> None:
        """Tell this node its earnings soon (it just connected, or its money moved)."""
        self._dirty_nodes.add(node.id)

    def changed(self, node_id: str) -> None:
        self._dirty_nodes.add(node_id)

    async def publish_earnings(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Every few seconds, tell nodes whose money moved what they have earned."""
        task_status.started()
        while True:
            await trio.sleep(2)
            dirty, self._dirty_nodes = self._dirty_nodes, set()
            online = sorted(n for n in dirty if n in self.registry.nodes)
            for start in range(0, len(online), PUBLISH_BATCH):
                batch = online[start : start + PUBLISH_BATCH]
                try:
                    figures = await self.of_many(batch)
                except Exception as exc:  # the store briefly failing: told next time
                    log.warning("earnings of %d nodes not read: %r", len(batch), exc)
                    self._dirty_nodes.update(batch)
                    continue
                for node_id, e in figures.items():
                    node = self.registry.nodes.get(node_id)
                    if node is None:
                        continue  # gone while its figures were read
                    node.send_nowait(
                        EarningsFrame(
                            earned_msat=e["earned_msat"],
                            held_msat=e["held_msat"],
                            payable_msat=e["payable_msat"],
                            paid_msat=e["paid_msat"],
                            pending_msat=e["pending_msat"],
                            threshold_sats=node.payout_threshold_sats,
                        )
                    )
