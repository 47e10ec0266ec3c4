"""Nodes held by another replica, reached through it.

A replica that has no suitable node of its own forwards the job to the replica whose
node serves the model (the directory says which, ``cluster.py``). To the scheduler a
remote node is one more ``NodeLink``: it opens an attempt, sends the ``Job`` frame,
and reads the node's frames from the attempt's inbox, so timeouts, failover before
the first token, cancellation and billing are the scheduler's, exactly as for a local
node; only this replica settles the job (it admitted it).

The wire: ``POST {replica}/internal/v1/nodes/{node_id}/jobs`` with the ``Job`` frame,
authenticated by the cluster secret; the answer streams the node's frames as owlrun
protocol JSON, one per line. Closing the stream cancels the job on the node (the
serving replica's exchange ends; ``routecat.api.internal``). Invariants: every frame
from another replica is decoded and validated like a node's; a frame for another job,
garbage, or a stream that ends without ``done``/``error`` fails only that attempt.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import attrs
import httpx
import trio

from owlrun.errors import LineTooLong
from owlrun.lines import drain, read_lines
from owlrun.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Chunks,
    Done,
    Embedded,
    Job,
    JobError,
    Message,
    ModelInfo,
    ProtocolError,
    decode,
    encode,
)
from routecat.clock import Clock
from routecat.config import Config
from routecat.db.cluster import DirectoryEntry
from routecat.network.link import Attempt, LinkCounters
from routecat.network.registry import Registry

log = logging.getLogger("routecat.network.remote")

INTERNAL_PATH = "/internal/v1/nodes/{node_id}/jobs"
STOCK_FETCH_PATH = "/internal/v1/stock/jobs/{job_id}"  # a stock agent's job fetch
KEY_HASH_HEADER = "X-RouteCat-Provider-Key-Hash"  # the agent's key, hashed: never the key
MAX_LINE = 4 * 1024 * 1024
# How long the end of a forwarded job's stream is waited for after its last frame.
REST_OF_STREAM_SECONDS = 2.0


@attrs.define(eq=False)
class RemoteLink(LinkCounters):
    """A node whose socket another replica holds."""

    id: str
    replica_id: str
    replica_url: str
    forwarder: Forwarder
    capacity: int
    models: dict[str, ModelInfo]
    name: str = ""
    payout_threshold_sats: int = 0
    attempts: dict[str, Attempt] = attrs.Factory(dict)
    draining: bool = False
    cooldown_until: float = 0.0
    failures: int = 0
    jobs_done: int = 0
    ttft_ema: float | None = None
    tps_ema: float | None = None
    reputation: float = 1.0
    closed_reason: str | None = None
    remote_in_flight: int = 0  # what the serving replica last published (others' jobs)
    # The serving replica checks its node's version itself (and refuses, retryably).
    protocol_version: int = PROTOCOL_VERSION
    _jobs: dict[str, trio.CancelScope] = attrs.Factory(dict)

    @property
    def in_flight(self) -> int:
        return max(len(self.attempts), self.remote_in_flight)

    def send_nowait(self, message: Message) -> bool:
        if isinstance(message, Job):
            attempt = self.attempts.get(message.job_id)
            if attempt is None:
                return False
            scope = trio.CancelScope()
            self._jobs[message.job_id] = scope
            return self.forwarder.start(self, attempt, message, scope)
        if isinstance(message, Cancel):
            self.cancel_job(message.job_id, message.reason)
        return True

    def cancel_job(self, job_id: str, reason: str) -> None:
        """Close the job's stream: the serving replica cancels it on the node."""
        scope = self._jobs.pop(job_id, None)
        if scope is not None:
            scope.cancel()

    def close(self, reason: str) -> None:
        """No new jobs for this node through this link. Jobs already streaming carry on:
        their streams say themselves whether the node is still there (a directory entry
        can lag behind a busy replica)."""
        if self.closed_reason is None:
            self.closed_reason = reason

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "replica": self.replica_id,
            "models": sorted(self.models),
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "draining": self.draining,
            "cooling_down_s": max(0.0, round(self.cooldown_until - now, 1)),
            "reputation": round(self.reputation, 3),
        }


def _models(entry: DirectoryEntry) -> dict[str, ModelInfo]:
    return {
        m: ModelInfo(
            name=m,
            context_length=entry.contexts.get(m),
            capabilities=["embedding"] if m in entry.embedding else [],
        )
        for m in entry.models
    }


@attrs.define(eq=False)
class Forwarder:
    """Keeps a ``RemoteLink`` per node of the other replicas, and runs forwarded jobs."""

    config: Config
    registry: Registry
    clock: Clock
    client: httpx.AsyncClient
    _nursery: trio.Nursery | None = None
    forwarded: int = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def update(self, entries: list[DirectoryEntry], urls: dict[str, str]) -> None:
        """The directory's latest word: links for new remote nodes, changes applied, links
        of nodes that left closed (their attempts fail, so jobs fail over)."""
        known = self.registry.remote
        seen = set()
        for entry in entries:
            url = urls.get(entry.replica_id)
            if not url or entry.node_id in self.registry.nodes:
                continue  # unreachable, or ours (it moved here)
            seen.add(entry.node_id)
            link = known.get(entry.node_id)
            if (
                link is None
                or not isinstance(link, RemoteLink)
                or link.replica_id != entry.replica_id
            ):
                if link is not None:
                    link.close("moved to another replica")
                link = RemoteLink(
                    id=entry.node_id,
                    replica_id=entry.replica_id,
                    replica_url=url,
                    forwarder=self,
                    capacity=entry.capacity,
                    models=_models(entry),
                )
                known[entry.node_id] = link
            else:
                link.capacity = entry.capacity
                link.models = _models(entry)
                link.replica_url = url
            link.remote_in_flight = entry.in_flight
        for node_id in [n for n in known if n not in seen]:
            known.pop(node_id).close("gone from the directory")
        self.registry.invalidate()
        self.registry.changed()

    def start(self, link: RemoteLink, attempt: Attempt, job: Job, scope: trio.CancelScope) -> bool:
        if self._nursery is None or not self.config.cluster_secret:
            return False
        self.forwarded += 1
        self._nursery.start_soon(self._forward, link, attempt, job, scope)
        return True

    async def _forward(
        self, link: RemoteLink, attempt: Attempt, job: Job, scope: trio.CancelScope
    ) -> None:
        url = link.replica_url.rstrip("/") + INTERNAL_PATH.format(node_id=link.id)
        headers = {"Authorization": f"Bearer {self.config.cluster_secret}"}
        reason: str | None = "the serving replica's stream ended early"
        with scope:
            try:
                async with self.client.stream(
                    "POST", url, content=encode(job), headers=headers
                ) as response:
                    if response.status_code != 200:
                        reason = f"the serving replica answered HTTP {response.status_code}"
                    else:
                        async with contextlib.aclosing(read_lines(response, MAX_LINE)) as lines:
                            async for line in lines:
                                if not line.strip():
                                    continue
                                frame = decode(line)
                                if not isinstance(
                                    frame, Chunk | Chunks | Done | Embedded | JobError
                                ):
                                    raise ProtocolError(f"unexpected {frame.type} frame")
                                if frame.job_id != job.job_id:
                                    raise ProtocolError("a frame for another job")
                                attempt.deliver_nowait(frame)
                                if isinstance(frame, Done | Embedded | JobError):
                                    reason = None  # the job's last frame: nothing failed
                                    await drain(lines, REST_OF_STREAM_SECONDS)
                                    break
            except ProtocolError as exc:
                reason = f"protocol violation from the serving replica: {exc}"
            except LineTooLong:
                reason = "a frame over the size limit"
            except httpx.HTTPError as exc:
                reason = f"the serving replica is unreachable ({type(exc).__name__})"
        link._jobs.pop(job.job_id, None)
        if reason is not None and not scope.cancelled_caught:
            attempt.fail_nowait(reason)

    async def fetch_stock_request(
        self, link: RemoteLink, job_id: str, key_hash: str
    ) -> dict[str, Any] | None:
        """A stock agent's job fetch that reached this replica while its socket (and so
        the request, kept in memory only) is on ``link``'s replica: asked of that one."""
        if not self.config.cluster_secret:
            return None
        url = link.replica_url.rstrip("/") + STOCK_FETCH_PATH.format(job_id=job_id)
        headers = {
            "Authorization": f"Bearer {self.config.cluster_secret}",
            KEY_HASH_HEADER: key_hash,
        }
        try:
            response = await self.client.get(url, headers=headers, timeout=10)
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("job %s not fetched from replica %s: %r", job_id, link.replica_id, exc)
            return None
        return body if isinstance(body, dict) else None
