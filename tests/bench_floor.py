"""The floor under the bench's figures: the server stack alone, with no gateway logic.

``python -m tests.bench_floor PORT WRITES`` serves a bare ASGI app under
``hypercorn.trio.serve`` (the server RouteCat runs in, configured as RouteCat runs it:
one process, hypercorn's access log off): every ``POST`` gets a canned OpenAI answer of the same
shape and size as the fake engine's, a chat completion, or, for ``"stream": true``,
64 one-token chunks, a usage chunk and ``[DONE]`` over SSE in ``WRITES`` body writes
(the number RouteCat made in the same run). No key, no ledger, no node: what is left
of RouteCat's CPU per request after this is its own work (and its node websocket).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

MODEL = "fast:1b"


def _chunk(created: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    event = {
        "id": "chatcmpl-floor0000000000000000",
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def answers(writes: int) -> tuple[bytes, list[bytes]]:
    """The canned non-stream body, and the SSE body cut into ``writes`` parts."""
    created = int(time.time())
    whole = {
        "id": "chatcmpl-floor0000000000000000",
        "object": "chat.completion",
        "created": created,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
    events = [_chunk(created, {"role": "assistant", "content": ""})]
    events += [_chunk(created, {"content": "tok"}) for _ in range(63)]
    events.append(_chunk(created, {}, "stop"))
    events.append(b"data: [DONE]\n\n")
    per = -(-len(events) // max(1, writes))
    parts = [b"".join(events[i : i + per]) for i in range(0, len(events), per)]
    return json.dumps(whole).encode(), parts


def app_for(writes: int) -> Any:
    body, parts = answers(writes)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        stream = b'"stream": true' in request or b'"stream":true' in request
        if not stream:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    port, writes = int(sys.argv[1]), int(sys.argv[2])
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    trio.run(hypercorn.trio.serve, app_for(writes), config)


if __name__ == "__main__":
    main()
