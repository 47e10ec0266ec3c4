"""Usage honesty: what nodes report against what the gateway observed.

Invariant: every settled job feeds one observation; a node whose reported tokens per
delivered byte stray far from the network's for the same model (completion or
prompt), whose reports exceed the sound bounds, who reports nothing, or whose done
frame broke the protocol, loses reputation (the scheduler prefers reputable nodes)
and is cooled down for a while. Honest jobs slowly restore it.

Prompt over-reporting: a node's reported prompt tokens are compared with what the
network's own bytes per token predicts for the prompt's bytes plus the bound's
template allowances (``reported / (B_in / bpt + allowance)``); an honest node stays
near or below 1 whatever the prompt's size, a node that reports at the byte bound
is near 4 for English, and a node whose median over recent jobs passes ``OUTLIER``
is penalised like a completion over-reporter.
"""

from __future__ import annotations

import statistics
from collections import deque

import attrs

from owlrun.protocol import Usage
from routecat.clock import Clock
from routecat.network.measure import DEFAULT_BYTES_PER_TOKEN
from routecat.network.registry import Registry

SAMPLES = 200
OUTLIER = 1.5  # reported/observed more than 1.5x the network's median is an outlier
COOLDOWN = 60.0


@attrs.define(eq=False)
class Reputation:
    registry: Registry
    clock: Clock
    # model -> recent bytes per reported completion token (honest, in-bounds reports)
    _bpt: dict[str, deque[float]] = attrs.Factory(dict)
    # (node, model) -> recent reported tokens per delivered byte
    _node_ratio: dict[tuple[str, str], deque[float]] = attrs.Factory(dict)
    # (node, model) -> recent reported prompt tokens over the network's expectation
    _node_prompt: dict[tuple[str, str], deque[float]] = attrs.Factory(dict)
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
        *,
        prompt_bytes: int = 0,
        prompt_allowance: int = 0,
        violation: str = "",
    ) -> str | None:
        """Record one done job; returns why the node was penalised, if it was."""
        if node_id is None:
            return None
        reason = None
        tokens = reported.completion_tokens if reported else None
        if violation:
            reason = f"broke the protocol: {violation[:120]}"
        elif tokens is None:
            reason = "reported no usage"
        elif capped:
            reason = "reported more tokens than the bound allows"
        else:
            reason = self._prompt_outlier(node_id, model, reported, prompt_bytes, prompt_allowance)
            if tokens > 0 and delivered_bytes > 0:
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
                    self._bpt.setdefault(model, deque(maxlen=SAMPLES)).append(
                        delivered_bytes / tokens
                    )
        self._adjust(node_id, reason)
        return reason

    def _prompt_outlier(
        self, node_id: str, model: str, reported: Usage | None, prompt_bytes: int, allowance: int
    ) -> str | None:
        prompt = reported.prompt_tokens if reported else None
        if prompt is None or prompt_bytes <= 0:
            return None
        bpt = self.bytes_per_token(model) or DEFAULT_BYTES_PER_TOKEN
        expected = prompt_bytes / bpt + allowance
        mine = self._node_prompt.setdefault((node_id, model), deque(maxlen=50))
        mine.append(prompt / expected)
        if len(mine) >= 3 and statistics.median(mine) > OUTLIER:
            return "reports far more prompt tokens than the network would count"
        return None

    def _adjust(self, node_id: str, reason: str | None) -> None:
        if reason is not None:
            self.penalties[node_id] = self.penalties.get(node_id, 0) + 1
        node = self.registry.nodes.get(node_id)
        if node is not None:
            node.judged(reason, self.clock.monotonic(), COOLDOWN)
