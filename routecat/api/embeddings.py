"""``POST /v1/embeddings``: OpenAI embeddings, served by nodes like any job.

Invariants: the request is admitted, scheduled, settled and audited like a chat job
(billed per input token, verified against the input's bytes, free tier per DESIGN);
the vectors a node sends are checked before they reach the client (one per input, one
dimension, finite numbers: ``network.measure.vector_problem``), and a node that sends
anything else has failed the job (tried elsewhere, not billed).
"""

from __future__ import annotations

from typing import Any

from quart import Response, request

from routecat import errors
from routecat.api.completions import free_header, start_job, usage_body
from routecat.api.http import App, json_response, read_json
from routecat.api.schema import EmbeddingRequest, parse_request
from routecat.gateway import Gateway
from routecat.network.jobs import Failure, Final, JobSpec, mint_job_id
from routecat.network.measure import measure_embedding, unpack_vector


def register_embeddings(app: App, gw: Gateway) -> None:
    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        key = await gw.keys.authenticate(request.headers.get("Authorization"))
        await gw.request_limit.acquire(f"key:{key.id}")
        body = parse_request(EmbeddingRequest, await read_json())
        inputs: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        gw.scheduler.check_model(body.model)
        measured = measure_embedding(inputs)
        wire: dict[str, Any] = {"input": inputs}
        if body.dimensions is not None:
            wire["dimensions"] = body.dimensions
        spec = JobSpec(
            job_id=mint_job_id("embedding"),
            kind="embedding",
            model=body.model,
            request=wire,
            stream=False,
            key_id=key.id,
            max_tokens=0,
            prompt_bound=measured.bound,
            prompt_bytes=measured.bytes,
        )
        handle = await start_job(gw, spec)
        async for event in handle.events:
            if isinstance(event, Failure):
                raise event.error
            if isinstance(event, Final):
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": vector
                        if body.encoding_format == "base64"
                        else unpack_vector(vector),
                    }
                    for i, vector in enumerate(event.vectors)
                ]
                usage = usage_body(event.bill)
                answer = {
                    "object": "list",
                    "data": data,
                    "model": body.model,
                    "usage": {
                        "prompt_tokens": usage["prompt_tokens"],
                        "total_tokens": usage["prompt_tokens"],
                        "cost_msat": usage["cost_msat"],
                    },
                }
                headers = {"X-RouteCat-Cost-Msat": str(event.bill.cost_msat)}
                return json_response(answer, headers={**headers, **free_header(handle)})
        # The job ended without a result: the gateway stopped it (shutdown).
        raise errors.ServiceUnavailable("the gateway stopped the job", retry_after=5)
