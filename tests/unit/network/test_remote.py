"""The other replicas' nodes as links: the directory's word becomes ``RemoteLink``s,
local nodes come first, and a node leaving the directory takes no new job but keeps
the ones streaming."""

from __future__ import annotations

import httpx
import trio

from routecat.clock import Clock
from routecat.config import Config
from routecat.db.cluster import DirectoryEntry
from routecat.network.remote import Forwarder, RemoteLink
from tests.unit.network.fakes import add_node, registry


def entry(node_id: str, replica: str, models: tuple[str, ...] = ("m",)) -> DirectoryEntry:
    return DirectoryEntry(node_id, replica, models, capacity=2, in_flight=0, seen_at=0.0)


async def test_directory_entries_become_links_and_local_nodes_come_first(
    autojump_clock: trio.abc.Clock,
) -> None:
    reg = registry()
    async with httpx.AsyncClient() as client:
        forwarder = Forwarder(Config(), reg, Clock(), client)
        urls = {"r_b": "http://b.internal"}
        forwarder.update([entry("far", "r_b"), entry("nowhere", "r_gone")], urls)
        assert set(reg.remote) == {"far"}  # a replica we cannot reach is ignored
        link = reg.remote["far"]
        assert isinstance(link, RemoteLink) and link.replica_url == "http://b.internal"
        assert reg.pick("m") is link and "m" in reg.online_models()
        near = add_node(reg, "near")
        assert reg.pick("m") is near.link  # ours first, however loaded the other is
        near.link.open_attempt("j1")  # capacity 1: now full
        assert reg.pick("m") is link
        # The same node published again: the same link (its cooldown and counts stay).
        link.failed(trio.current_time())
        forwarder.update([entry("far", "r_b")], urls)
        assert reg.remote["far"] is link and link.failures == 1


async def test_a_node_leaving_the_directory_keeps_its_streaming_jobs(
    autojump_clock: trio.abc.Clock,
) -> None:
    reg = registry()
    async with httpx.AsyncClient() as client:
        forwarder = Forwarder(Config(), reg, Clock(), client)
        forwarder.update([entry("far", "r_b")], {"r_b": "http://b.internal"})
        link = reg.remote["far"]
        attempt = link.open_attempt("job-1")
        forwarder.update([], {})
        assert "far" not in reg.remote and link.closed_reason == "gone from the directory"
        assert not attempt.finished  # its stream decides, not the directory
        assert reg.pick("m") is None
