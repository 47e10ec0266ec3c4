"""The replicas' internal endpoints: run a job forwarded by another replica on one of
our nodes and stream the node's frames back (``routecat.network.remote`` is the
other end); hand a stock agent's job request to the replica its fetch reached.

Invariants: only a caller with the cluster secret gets anything (without it, or with
forwarding off, the route answers like an unknown one); the job runs on the node the
caller named and on no other (the caller chose it, and fails over itself); the
forwarding replica admitted and settles the job, so nothing here touches money; when
the stream ends for any reason the job is released here and, if unfinished, cancelled
on the node.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

from quart import Response, request

from owlrun.protocol import (
    EMBEDDING_PROTOCOL,
    Done,
    Embedded,
    Job,
    JobError,
    ProtocolError,
    decode,
    encode,
)
from routecat import errors
from routecat.api.http import App, json_response, on_exchange_end
from routecat.gateway import Gateway
from routecat.network.remote import INTERNAL_PATH, KEY_HASH_HEADER, STOCK_FETCH_PATH
from routecat.network.stock import fetch_request

NDJSON = "application/x-ndjson"


def _line(frame: object) -> bytes:
    return encode(frame).encode() + b"\n"  # type: ignore[arg-type]


def register_internal(app: App, gw: Gateway) -> None:
    def authorized() -> None:
        """Only another replica (it has the cluster secret) sees these routes."""
        secret = gw.config.cluster_secret
        given = request.headers.get("Authorization", "")
        if not secret or not hmac.compare_digest(given.encode(), f"Bearer {secret}".encode()):
            raise errors.NotFound(f"no route for {request.method} {request.path}")

    @app.get(STOCK_FETCH_PATH.replace("{job_id}", "<job_id>"))
    async def forwarded_stock_fetch(job_id: str) -> Response:
        """A stock agent's job fetch that reached another replica: the request, once,
        if this replica holds the job for that agent's key."""
        authorized()
        digest = request.headers.get(KEY_HASH_HEADER, "")
        body = fetch_request(list(gw.registry.nodes.values()), job_id, digest)
        if body is None:
            raise errors.NotFound("no such job for this key (or already fetched, or expired)")
        return json_response(body)

    @app.post(INTERNAL_PATH.replace("{node_id}", "<node_id>"))
    async def forwarded_job(node_id: str) -> Response:
        authorized()
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        try:
            job = decode(body)
        except ProtocolError as exc:
            raise errors.InvalidRequest(f"not a job frame: {exc}") from None
        if not isinstance(job, Job):
            raise errors.InvalidRequest(f"expected a job frame, got {job.type}")
        node = gw.registry.nodes.get(node_id)
        too_old = job.kind == "embedding" and (
            node is not None and node.protocol_version < EMBEDDING_PROTOCOL
        )
        if node is None or too_old or not node.has_slot() or job.job_id in node.attempts:
            why = "not on this replica" if node is None else "too old" if too_old else "busy"

            refusal = JobError(
                job_id=job.job_id, message=f"node {node_id} is {why}", retryable=True
            )
            return Response(_line(refusal), content_type=NDJSON)
        attempt = node.open_attempt(job.job_id)
        if not node.send_nowait(job):
            del node.attempts[job.job_id]
            gone = JobError(job_id=job.job_id, message="the node went away", retryable=True)
            return Response(_line(gone), content_type=NDJSON)
        gw.registry.changed()

        def release() -> None:
            if node.attempts.get(job.job_id) is attempt:
                del node.attempts[job.job_id]
                if not attempt.finished:
                    node.cancel_job(job.job_id, "the forwarding replica stopped the job")
            attempt.send.close()
            gw.registry.changed()

        on_exchange_end(release)

        async def frames() -> AsyncIterator[bytes]:
            async for frame in attempt.inbox:
                yield _line(frame)
                if isinstance(frame, Done | Embedded | JobError):
                    return
            reason = attempt.failure or "the node disconnected"
            yield _line(JobError(job_id=job.job_id, message=reason, retryable=True))

        return Response(frames(), content_type=NDJSON)
