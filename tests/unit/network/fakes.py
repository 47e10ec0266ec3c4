"""Fake nodes for the unit tier: a ``NativeLink`` whose outbox is a memory channel the
test reads, and a registry on an in-memory store that never starts a thread."""

from __future__ import annotations

import attrs
import trio

from ledger import book
from ledger.store import Store, run_inline
from owlrun.protocol import Hardware, Message, ModelInfo
from routecat.clock import Clock
from routecat.db import schema
from routecat.metrics import Metrics
from routecat.network.link import NativeLink
from routecat.network.registry import Registry


def memory_store() -> Store:
    """SQLite in memory, run on the trio thread: safe under ``autojump_clock``."""
    store = Store.open(":memory:", runner=run_inline)
    store.migrate(book.COMPONENT, book.MIGRATIONS)
    store.migrate(schema.COMPONENT, schema.MIGRATIONS)
    return store


def registry(clock: Clock | None = None) -> Registry:
    return Registry(memory_store(), Metrics(), clock=clock or Clock())


@attrs.define(eq=False)
class FakeNode:
    link: NativeLink
    outbox: trio.MemoryReceiveChannel[Message]


def add_node(
    registry: Registry, node_id: str, models: tuple[str, ...] = ("m",), capacity: int = 1
) -> FakeNode:
    """A node online in ``registry``: what the gateway sends it arrives in ``outbox``."""
    send, receive = trio.open_memory_channel[Message](64)
    now = trio.current_time()
    link = NativeLink(
        id=node_id,
        name=node_id,
        agent_version="fake",
        capacity=capacity,
        models={m: ModelInfo(name=m) for m in models},
        hardware=Hardware(),
        payout_address="",
        payout_threshold_sats=1000,
        outbox=send,
        connected_at=now,
        last_seen=now,
    )
    registry.nodes[node_id] = link
    registry.membership_changed()
    return FakeNode(link, receive)
