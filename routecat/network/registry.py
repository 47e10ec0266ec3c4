"""The node registry: who is online, what they serve, which models the network knows.

Invariants: a node id is bound to the hash of its secret at first contact (a known id
with another secret is refused, a banned id too); a model is *known* when it is in
the price catalog or some node advertised it within 24 hours (remembered across
restarts), so a briefly empty network answers 503, not 404.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from ledger.store import Connection, Storage
from owlrun.protocol import Hello, ModelInfo
from routecat.clock import Clock
from routecat.db import nodes as stored
from routecat.metrics import Metrics
from routecat.network.link import NodeLink

KNOWN_FOR = 24 * 3600.0
# Up to this many candidates a pick compares them all; above, it compares a random
# sample of PICK_SAMPLE (the power of k choices), so its cost stays flat as the
# network grows, and falls back to comparing all only when the sample has no free slot.
EXACT_PICK = 64
PICK_SAMPLE = 16
# The epoch that replicas watch to close nodes banned elsewhere.
BANS_EPOCH = "bans"
NODE_ID = re.compile(r"[A-Za-z0-9_-]{4,64}")
# 1 to 200 characters: no control characters, no lone surrogates.
MODEL_NAME = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,200}")
MAX_MODELS = 1000


def models_ok(models: list[ModelInfo]) -> bool:
    """A node's model list: at most 1,000 names of 1 to 200 characters, no control ones."""
    return len(models) <= MAX_MODELS and all(MODEL_NAME.fullmatch(m.name) for m in models)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@attrs.define(eq=False)
class Registry:
    """Online nodes, their models, and which models the network has seen lately."""

    store: Storage
    metrics: Metrics
    clock: Clock
    nodes: dict[str, NodeLink] = attrs.Factory(dict)  # the nodes whose sockets we hold
    remote: dict[str, NodeLink] = attrs.Factory(dict)  # other replicas' (network.remote)
    model_seen: dict[str, float] = attrs.Factory(dict)
    catalog_models: frozenset[str] = frozenset()
    # Why a payout address cannot be used (None: it can); the money layer supplies the
    # Lightning Address rules, so the network layer does not depend on it.
    address_problem: Callable[[str], str | None] = lambda address: None
    _changed: trio.Event = attrs.Factory(trio.Event)
    _membership: trio.Event = attrs.Factory(trio.Event)
    # Per model, the nodes that advertise it: (ours, other replicas'), rebuilt on the
    # first lookup after a node came, went or changed its models (``invalidate``).
    _index: dict[str, tuple[list[NodeLink], list[NodeLink]]] | None = None
    _contexts: dict[str, int | None] = attrs.Factory(dict)

    async def load(self) -> None:
        self.model_seen = await self.store.read(stored.models_seen)

    def changed(self) -> None:
        """Wake everyone waiting for capacity; the next waiters get a fresh event."""
        self._changed.set()
        self._changed = trio.Event()
        self.metrics.nodes_online.set(len(self.nodes))

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def invalidate(self) -> None:
        """Nodes came, went or changed their models (ours, or another replica's)."""
        self._index = None
        self._contexts.clear()

    def _serving_all(self, model: str) -> tuple[list[NodeLink], list[NodeLink]]:
        """(ours, other replicas') that advertise ``model``, closed ones included."""
        if self._index is None:
            index: dict[str, tuple[list[NodeLink], list[NodeLink]]] = {}
            for node in self.nodes.values():
                for name in node.models:
                    index.setdefault(name, ([], []))[0].append(node)
            for node_id, node in self.remote.items():
                if node_id not in self.nodes:
                    for name in node.models:
                        index.setdefault(name, ([], []))[1].append(node)
            self._index = index
        return self._index.get(model, ([], []))

    def membership_changed(self) -> None:
        """A node came, went, drains or changed its models (the cluster republishes the
        directory at once)."""
        self.invalidate()
        self._membership.set()
        self._membership = trio.Event()
        self.changed()

    async def wait_membership(self) -> None:
        await self._membership.wait()

    def everywhere(self) -> list[NodeLink]:
        """Our nodes, then the other replicas' (a node is in one or the other)."""
        return [*self.nodes.values(), *(n for i, n in self.remote.items() if i not in self.nodes)]

    def serving(self, model: str) -> list[NodeLink]:
        ours, theirs = self._serving_all(model)
        return [n for n in (*ours, *theirs) if n.closed_reason is None]

    def online_models(self) -> dict[str, list[NodeLink]]:
        out: dict[str, list[NodeLink]] = {}
        for node in self.everywhere():
            if node.closed_reason is None:
                for model in node.models:
                    out.setdefault(model, []).append(node)
        return out

    def context_length(self, model: str) -> int | None:
        """The largest context length any node serving ``model`` reported, if any
        (computed once per model until nodes change, ``invalidate``: every request asks)."""
        if model not in self._contexts:
            lengths = [
                n.models[model].context_length
                for n in self.serving(model)
                if n.models[model].context_length
            ]
            self._contexts[model] = max((x for x in lengths if x), default=None)
        return self._contexts[model]

    def is_embedding(self, model: str) -> bool:
        """Some node serving ``model`` says it is an embedding model."""
        return any("embedding" in n.models[model].capabilities for n in self.serving(model))

    def is_known(self, model: str) -> bool:
        """Known: in the price catalog, or advertised by some node within 24 hours."""
        if model in self.catalog_models:
            return True
        if any(n.closed_reason is None for n in itertools.chain(*self._serving_all(model))):
            return True
        seen = self.model_seen.get(model)
        return seen is not None and self.clock.wall() - seen < KNOWN_FOR

    def pick(
        self, model: str, exclude: Iterable[str] = (), *, min_protocol: int = 1
    ) -> NodeLink | None:
        """The best node with a free slot: least loaded, then fastest, then most reputable;
        one of ours if any is free, else one another replica holds (forwarded). Among
        more than ``EXACT_PICK`` candidates, the best of a random sample."""
        excluded = set(exclude)
        for candidates in self._serving_all(model):
            if len(candidates) > EXACT_PICK:
                sample = random.sample(candidates, PICK_SAMPLE)
                best = self._best(sample, excluded, min_protocol)
                if best is not None:
                    return best
            best = self._best(candidates, excluded, min_protocol)
            if best is not None:
                return best
        return None

    def _best(
        self, candidates: list[NodeLink], excluded: set[str], min_protocol: int
    ) -> NodeLink | None:
        now = self.clock.monotonic()
        best: NodeLink | None = None
        best_score = 0.0
        for node in candidates:
            if (
                node.protocol_version < min_protocol
                or node.id in excluded
                or not node.has_slot()
                or node.cooldown_until > now
            ):
                continue
            load = (node.in_flight + 1) / node.capacity
            speed = node.tps_ema or 1.0
            score = load / (speed**0.5) / max(node.reputation, 0.05)
            if best is None or score < best_score:
                best, best_score = node, score
        return best

    async def remember_models(self, models: Iterable[str]) -> None:
        now = self.clock.wall()
        names = list(models)
        for name in names:
            self.model_seen[name] = now

        if names:
            await self.store.write(lambda db: stored.remember_models(db, names, now))

    async def authenticate(self, hello: Hello, secret: str) -> str | None:
        """None if the node may connect, else the reason it may not. A new id is
        registered with its secret's hash; a known id must present the same secret."""
        digest = hash_secret(secret)

        def check(db: Connection) -> str | None:
            known = stored.node(db, hello.node_id)
            now = self.clock.now_iso()
            settings = (hello.name, hello.payout_address, hello.payout_threshold_sats, now)
            if known is None:
                stored.insert_node(db, hello.node_id, digest, *settings)
                return None
            if not hmac.compare_digest(known.secret_hash, digest):
                return "wrong secret for this node id"
            if known.banned_at is not None:
                return f"node is banned: {known.ban_reason or 'no reason given'}"
            stored.update_node(db, hello.node_id, *settings)
            return None

        return await self.store.write(check)

    def statistics(self) -> dict[str, Any]:
        return {
            "nodes_online": len(self.nodes),
            "models_online": len(self.online_models()),
            "in_flight": sum(n.in_flight for n in self.nodes.values()),
        }

    async def close_banned(self) -> None:
        """Close every connected node that is banned (the operator banned it, perhaps
        through another replica)."""
        ids = list(self.nodes)
        for node_id in await self.store.read(lambda db: stored.banned_among(db, ids)):
            node = self.nodes.get(node_id)
            if node is not None:
                node.close("banned by the operator")
