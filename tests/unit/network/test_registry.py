"""The registry's choices: which node gets a job, which models are known."""

from __future__ import annotations

import trio

from routecat.clock import Clock
from routecat.network.registry import KNOWN_FOR
from tests.unit.network.fakes import add_node, registry


async def test_pick_prefers_free_fast_reputable_nodes_and_skips_cooling_ones(
    autojump_clock,
) -> None:
    reg = registry()
    slow = add_node(reg, "slow", capacity=4)
    fast = add_node(reg, "fast", capacity=4)
    shady = add_node(reg, "shady", capacity=4)
    slow.link.tps_ema, fast.link.tps_ema, shady.link.tps_ema = 10.0, 90.0, 500.0
    shady.link.judged("over-reports", trio.current_time(), cooldown=0.0)
    shady.link.judged("over-reports", trio.current_time(), cooldown=0.0)
    shady.link.judged("over-reports", trio.current_time(), cooldown=0.0)
    assert reg.pick("m").id == "fast"  # shady is faster but its reputation is 1/8
    for job in ("a", "b", "c"):
        fast.link.open_attempt(job)
    assert reg.pick("m").id == "slow"  # fast is nearly full now
    assert reg.pick("m", exclude=["slow"]).id in {"fast", "shady"}
    slow.link.failed(trio.current_time())
    assert reg.pick("m", exclude=["fast", "shady"]) is None  # cooling down
    await trio.sleep(5)
    assert reg.pick("m", exclude=["fast", "shady"]).id == "slow"
    assert reg.pick("other") is None


async def test_a_model_stays_known_for_a_day_after_its_last_node_left(autojump_clock) -> None:
    now = [1_000_000.0]
    reg = registry(Clock(wall=lambda: now[0]))
    node = add_node(reg, "a", models=("gone-soon",))
    await reg.remember_models(["gone-soon"])
    del reg.nodes["a"]
    node.link.close("left")
    assert reg.is_known("gone-soon") and not reg.serving("gone-soon")
    now[0] += KNOWN_FOR - 1
    assert reg.is_known("gone-soon")
    now[0] += 2
    assert not reg.is_known("gone-soon")
    # Remembered in the store: a restarted registry knows it too (until it expires).
    again = registry()
    again.store = reg.store
    await again.load()
    assert again.model_seen == {"gone-soon": 1_000_000.0}


async def test_a_large_network_is_picked_by_sample_and_a_lone_free_slot_still_found(
    autojump_clock: trio.abc.Clock,
) -> None:
    from routecat.network.registry import EXACT_PICK

    reg = registry()
    nodes = [add_node(reg, f"node{i:04d}", capacity=2) for i in range(1000)]
    # Every pick finds a free node, and spreads the load: no node gets a second job
    # while a third of the network is still idle.
    for n in range(300):
        picked = reg.pick("m")
        assert picked is not None and picked.has_slot()
        picked.open_attempt(f"job{n}")
    assert max(node.link.in_flight for node in nodes) == 1
    # All full but one: the sample misses it, the exact pass finds it.
    for node in nodes:
        while node.link.has_slot():
            node.link.open_attempt(f"fill-{node.link.id}-{node.link.in_flight}")
    lone = nodes[777].link
    lone.attempts.pop(next(iter(lone.attempts)))
    assert lone.has_slot() and reg.pick("m") is lone
    assert reg.pick("m", exclude=[lone.id]) is None
    # Nodes leaving are seen at once (the index is rebuilt).
    del reg.nodes[lone.id]
    reg.membership_changed()
    assert reg.pick("m") is None and len(reg.serving("m")) == 999 > EXACT_PICK
