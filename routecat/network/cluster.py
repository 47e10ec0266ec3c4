"""Membership of the replicas that share one database.

Invariants: every ``cluster_interval`` seconds a replica records that it is alive
(``replicas``), publishes the nodes whose sockets it holds (``node_directory``), and
reads back who else is alive, which nodes they hold, and the epochs of shared caches;
a replica silent for ``replica_liveness`` seconds is dead to the others (its
reservations are released by their sweepers, its directory entries ignored and then
removed). A replica that stops cleanly removes itself at once.

With one SQLite process this is the same loop over a cluster of one: nobody else is
ever alive, so nothing is spared and nothing is forwarded.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

import attrs
import trio

from ledger.store import Connection, Storage
from routecat.clock import Clock
from routecat.config import Config
from routecat.db import cluster as stored
from routecat.db.cluster import DirectoryEntry, Replica
from routecat.network.registry import Registry

log = logging.getLogger("routecat.cluster")


def mint_replica_id() -> str:
    return "r_" + secrets.token_hex(6)


@attrs.define(eq=False)
class Cluster:
    store: Storage
    config: Config
    registry: Registry
    clock: Clock
    shared: bool = False  # PostgreSQL: other replicas may share the database
    id: str = attrs.Factory(mint_replica_id)
    url: str = ""  # how the others reach this replica (its internal endpoint)
    others: dict[str, Replica] = attrs.Factory(dict)  # live replicas but this one
    remote: list[DirectoryEntry] = attrs.Factory(list)  # nodes the others hold
    _epochs: dict[str, int] = attrs.Factory(dict)
    # epoch name -> what to do when another replica (or the CLI) bumps it
    on_epoch: dict[str, Callable[[], Awaitable[None]]] = attrs.Factory(dict)
    # told after every round what the others hold, and where they are (network.remote)
    on_directory: Callable[[list[DirectoryEntry], dict[str, str]], None] | None = None
    rounds: int = 0

    def alive_others(self) -> set[str]:
        return set(self.others)

    def entries(self) -> list[DirectoryEntry]:
        now = self.clock.wall()
        return [
            DirectoryEntry(
                node.id,
                self.id,
                tuple(sorted(node.models)),
                node.capacity,
                node.in_flight,
                now,
                {m.name: m.context_length for m in node.models.values() if m.context_length},
                frozenset(m.name for m in node.models.values() if "embedding" in m.capabilities),
            )
            for node in self.registry.nodes.values()
            if node.closed_reason is None and not node.draining
        ]

    async def sync(self) -> None:
        """One round: beat, publish, and read the others (one transaction each way)."""
        now = self.clock.wall()
        since = now - self.config.replica_liveness
        # The node directory is for other replicas: one SQLite process publishes none
        # (with 10,000 nodes, writing and reading it back was a fifth of a core).
        mine = self.entries() if self.shared else []

        def write(db: Connection) -> None:
            stored.beat(db, self.id, self.url, now)
            if self.shared:
                stored.publish_nodes(db, self.id, mine, now)
            stored.forget_stale(db, now - 10 * self.config.replica_liveness)
            stored.prune_hits(db, now - 2 * 3600)

        await self.store.write(write)

        def read(
            db: Connection,
        ) -> tuple[list[Replica], list[DirectoryEntry], dict[str, int]]:
            found = stored.directory(db, since) if self.shared else []
            return stored.replicas(db, since), found, stored.epochs(db)

        alive, found, epochs = await self.store.read(read)
        if self.shared:
            self.others = {r.id: r for r in alive if r.id != self.id}
            self.remote = [e for e in found if e.replica_id in self.others]
        # One SQLite process owns its file (the admin socket says so): whatever else the
        # tables name is a previous run of this gateway, dead.
        if self.on_directory is not None:
            self.on_directory(self.remote, {r.id: r.url for r in self.others.values()})
        for name, value in epochs.items():
            if self._epochs.get(name, value) != value:
                callback = self.on_epoch.get(name)
                if callback is not None:
                    await callback()
            self._epochs[name] = value
        self.rounds += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.sync()
        task_status.started()
        try:
            while True:
                # Every interval, and at once when one of our nodes comes or goes.
                with trio.move_on_after(self.config.cluster_interval):
                    await self.registry.wait_membership()
                    await trio.sleep(0.05)  # a few arrivals together: one round
                try:
                    await self.sync()
                except Exception as exc:  # the database briefly away: the next round
                    log.warning("cluster round failed: %r", exc)
        finally:
            with trio.move_on_after(5, shield=True):
                try:
                    await self.store.write(lambda db: stored.forget_replica(db, self.id))
                except Exception as exc:
                    log.warning("could not leave the cluster cleanly: %r", exc)
