"""Usage honesty: what nodes report against what the gateway observed.

Invariant: every settled job feeds one observation; a node whose reported tokens per
delivered byte stray far from the network's for the same model, whose reports exceed
the sound bounds, or who reports nothing, loses reputation (the scheduler prefers
reputable nodes) and is cooled down for a while. Honest jobs slowly restore it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

import attrs
import trio

from owlrun.protocol import Usage
from routecat.nodes import Registry

SAMPLES = 200
OUTLIER = 1.5  # reported/observed more than 1.5x the network's median is an outlier
PENALTY = 0.5
RECOVERY = 0.05
COOLDOWN = 60.0


@attrs.define(eq=False)
class Reputation:
    registry: Registry
    clock: Callable[[], float] = trio.current_time
    # model -> recent bytes per reported completion token (honest, in-bounds reports)
    _bpt: dict[str, deque[float]] = attrs.Factory(dict)
    # (node, model) -> recent reported tokens per delivered byte
    _node_ratio: dict[tuple[str, str], deque[float]] = attrs.Factory(dict)
    penalties: dict[str, int] = attrs.Factory(dict)

    def bytes_per_token(self, model: str) -> float | None:
        """The network's median bytes per token for the model, if known."""
        samples = self._bpt.get(model)
        return statistics.median(samples) if samples and len(samples) >= 5 else None

    def observe(
        self,
        node_id: str | None,
        model: str,
        reported: Usage | None,
        delivered_bytes: int,
        capped: bool,
    ) -> str | None:
        """Record one done job; returns why the node was penalised, if it was."""
        if node_id is None:
            return None
        reason = None
        tokens = reported.completion_tokens if reported else None
        if tokens is None:
            reason = "reported no usage"
        elif capped:
            reason = "reported more tokens than the bound allows"
        elif tokens > 0 and delivered_bytes > 0:
            ratio = tokens / delivered_bytes
            key = (node_id, model)
            mine = self._node_ratio.setdefault(key, deque(maxlen=50))
            mine.append(ratio)
            network = self.bytes_per_token(model)
            if network is not None and len(mine) >= 3:
                expected = 1 / network
                if statistics.median(mine) > OUTLIER * expected:
                    reason = "reports far more tokens per byte than the network"
            if reason is None:
                self._bpt.setdefault(model, deque(maxlen=SAMPLES)).append(delivered_bytes / tokens)
        self._adjust(node_id, reason)
        return reason

    def _adjust(self, node_id: str, reason: str | None) -> None:
        node = self.registry.nodes.get(node_id)
        if reason is None:
            if node is not None:
                node.reputation = min(1.0, node.reputation + RECOVERY)
            return
        self.penalties[node_id] = self.penalties.get(node_id, 0) + 1
        if node is not None:
            node.reputation = max(0.05, node.reputation * PENALTY)
            node.cooldown_until = max(node.cooldown_until, self.clock() + COOLDOWN)
