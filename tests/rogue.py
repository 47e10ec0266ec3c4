"""A node that speaks the wire protocol by hand: it sends whatever a test tells it to,
valid or not, over a real websocket to a live gateway (``rogue_node``)."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio
import trio_websocket

from owlrun.agent import open_gateway_socket, websocket_url
from owlrun.protocol import NODE_HEADER, SECRET_HEADER, Job, Message, ProtocolError, decode

ROGUE_MODEL = "rogue-model"


@attrs.define(eq=False)
class Rogue:
    ws: trio_websocket.WebSocketConnection
    node_id: str
    reply: dict[str, Any]
    received: list[Message] = attrs.Factory(list)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def answer(self, job_id: str, text: str, usage: Any = None) -> None:
        """An honest answer: one chunk, then done (with ``usage`` as given, valid or not)."""
        await self.send({"type": "chunk", "job_id": job_id, "delta": {"content": text}})
        done = {"type": "done", "job_id": job_id, "finish_reason": "stop"}
        await self.send(done if usage is None else {**done, "usage": usage})

    async def next_message(self) -> Message:
        while True:
            try:
                message = decode(await self.ws.get_message())
            except ProtocolError:
                continue
            self.received.append(message)
            return message

    async def next_job(self) -> Job:
        while True:
            message = await self.next_message()
            if isinstance(message, Job):
                return message

    @property
    def closed(self) -> bool:
        return self.ws.closed is not None


def hello(node_id: str, **fields: Any) -> dict[str, Any]:
    frame = {
        "type": "hello",
        "node_id": node_id,
        "agent_version": "rogue/1",
        "protocol_version": 2,
        "models": [{"name": ROGUE_MODEL}],
        "max_concurrency": 8,
    }
    frame.update(fields)
    return frame


@contextlib.asynccontextmanager
async def rogue_node(
    gateway_url: str,
    *,
    node_id: str | None = None,
    secret: str | None = None,
    heartbeat: float = 0.3,
    **hello_fields: Any,
) -> AsyncIterator[Rogue]:
    """Connect, say hello (any fields the test wants), send heartbeats, and hand the
    socket to the test; the reply to the hello is ``rogue.reply`` (welcome or refused)."""
    node_id = node_id or "rogue_" + secrets.token_hex(6)
    secret = secret or secrets.token_urlsafe(24)
    headers = [(NODE_HEADER, node_id), (SECRET_HEADER, secret)]
    async with open_gateway_socket(
        websocket_url(gateway_url), headers, max_message_size=16 * 1024 * 1024
    ) as ws:
        await ws.send_message(json.dumps(hello(node_id, **hello_fields)))
        with trio.fail_after(10):
            reply = json.loads(await ws.get_message())
        rogue = Rogue(ws, node_id, reply)

        async def beat() -> None:
            with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                while True:
                    await trio.sleep(heartbeat)
                    await ws.send_message('{"type":"heartbeat","in_flight":0}')

        async with trio.open_nursery() as nursery:
            nursery.start_soon(beat)
            try:
                yield rogue
            finally:
                nursery.cancel_scope.cancel()
