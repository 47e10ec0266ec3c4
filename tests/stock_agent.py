"""An emulator of the stock Go Owlrun agent, written from ``shared/notes/owlrun-go.md``
(there is no Go toolchain here): registration with backoff, the websocket
authenticated by the provider key in its query, a heartbeat at once and then every
``heartbeat`` seconds, ``pong`` for ``ping``, ``accept``/``reject``, the request fetched
by job id, the engine's raw SSE relayed in pieces of ``piece`` bytes (4,096 by default,
cutting lines and, like Go's JSON encoding, turning a split UTF-8 character into
U+FFFD), ``proxy_done``, every job run at once, no cancel, and silence when the engine
fails."""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import trio
import trio_websocket

from owlrun.agent import open_gateway_socket


def provider_key() -> str:
    return "owlr_prov_" + secrets.token_hex(24)


@attrs.define(eq=False)
class StockAgent:
    gateway: str
    engine_url: str
    models: list[str]
    key: str = attrs.Factory(provider_key)
    node_id: str = attrs.Factory(lambda: str(uuid.uuid4()))
    lightning_address: str = ""
    threshold_sats: int = 1000  # its redeem_threshold_sats
    fetch: bool = True  # False: it accepts jobs and never fetches them
    piece: int = 4096
    heartbeat: float = 30.0
    acks: list[dict[str, Any]] = attrs.Factory(list)
    jobs: list[str] = attrs.Factory(list)
    fetched: list[dict[str, Any]] = attrs.Factory(list)
    registered: int = 0
    connected: bool = False
    usage_factor: float = 1.0  # > 1: a lying agent inflates the relayed usage
    reject_all: bool = False  # every job rejected ("no_vram")
    register_at: str = ""  # another replica for the registration (a load balancer's doing)
    fetch_at: str = ""  # another replica for the job fetch (the same)
    _job_nursery: Any = None

    async def register(self, client: httpx.AsyncClient) -> httpx.Response:
        body = {
            "node_id": self.node_id,
            "api_key": self.key,
            "gpu": "Fake GPU",
            "gpu_vendor": "fake",
            "vram_total_mb": 8192,
            "vram_free_mb": 8000,
            "vram_exact": True,
            "models": self.models,
            "ollama_url": self.engine_url,
            "region": "eu",
            "wallet": "",
            "referral_code": "",
            "lightning_address": self.lightning_address,
            "redeem_threshold_sats": self.threshold_sats,
            "free_tier_pct": 0,
            "version": "owlrun-go/1.4.2",
        }
        return await client.post(
            f"{self.register_at or self.gateway}/v1/gateway/register",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            trio.open_nursery() as jobs,  # a job outlives its session, as in the Go agent
        ):
            self._job_nursery = jobs
            while True:
                delay = 1.0
                while (await self.register(client)).status_code not in (200, 201):
                    await trio.sleep(delay)
                    delay = min(30.0, delay * 2)
                self.registered += 1
                url = self.gateway.replace("http", "ws", 1) + f"/v1/gateway/ws?api_key={self.key}"
                try:
                    # A socket whose TCP stream is always closed, even when the gateway
                    # closes first (trio-websocket's own leaves it to the collector).
                    async with open_gateway_socket(url, [], max_message_size=1 << 20) as ws:
                        first, started = not started, True
                        await self._session(ws, client, task_status if first else None)
                except* (trio_websocket.ConnectionClosed, OSError, trio_websocket.HandshakeError):
                    pass
                finally:
                    self.connected = False
                await trio.sleep(1.0)

    async def _session(self, ws: Any, client: httpx.AsyncClient, task_status: Any) -> None:
        self.connected = True

        async def send(frame: dict[str, Any]) -> None:
            await ws.send_message(json.dumps(frame))

        async with trio.open_nursery() as nursery:

            async def beats() -> None:
                while True:
                    await send(
                        {
                            "type": "heartbeat",
                            "node_id": self.node_id,
                            "gpu_util_pct": 3,
                            "vram_free_mb": 8000,
                            "temp_c": 40,
                            "power_w": 30,
                            "queue_depth": 0,
                            "earning_state": "earning",
                        }
                    )
                    await trio.sleep(self.heartbeat)

            nursery.start_soon(beats)
            if task_status is not None:
                task_status.started()
            while True:
                frame = json.loads(await ws.get_message())
                kind = frame.get("type")
                if kind == "ping":
                    await send({"type": "pong"})
                elif kind == "heartbeat_ack":
                    self.acks.append(frame)
                elif kind == "job":
                    self._job_nursery.start_soon(self._job, send, client, frame)
                elif kind == "drain":
                    return

    async def _job(self, send: Any, client: httpx.AsyncClient, frame: dict[str, Any]) -> None:
        """One job, to its end or its first failed write (the session may be gone)."""
        # Its next write failing (the session gone) stops the job, as in the Go agent.
        with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError):
            await self._serve(send, client, frame)

    async def _serve(self, send: Any, client: httpx.AsyncClient, frame: dict[str, Any]) -> None:
        job_id, model = frame["job_id"], frame["model"]
        self.jobs.append(job_id)
        if model not in self.models or self.reject_all:
            reason = "no_vram" if self.reject_all else "model_not_loaded"
            await send({"type": "reject", "job_id": job_id, "reason": reason})
            return
        await send({"type": "accept", "job_id": job_id})
        if not self.fetch:
            return
        r = await client.get(
            f"{self.fetch_at or self.gateway}/v1/gateway/jobs/{job_id}/proxy/request",
            headers={"Authorization": f"Bearer {self.key}"},
        )
        if r.status_code != 200:
            return
        body = r.json()
        self.fetched.append(body)
        body.setdefault("stream", True)
        body.setdefault("stream_options", {"include_usage": True})
        try:
            request = client.build_request(
                "POST", f"{self.engine_url}/v1/chat/completions", json=body
            )
            response = await client.send(request, stream=True)
        except httpx.HTTPError:
            return
        try:
            if response.status_code != 200:
                return  # the Go agent sends nothing at all when the engine fails
            pending = b""
            async for chunk in response.aiter_raw():
                pending += self._lie(chunk)
                while len(pending) >= self.piece:
                    piece, pending = pending[: self.piece], pending[self.piece :]
                    await send(
                        {
                            "type": "proxy_chunk",
                            "job_id": job_id,
                            "data": piece.decode(errors="replace"),
                        }
                    )
            if pending:
                await send(
                    {
                        "type": "proxy_chunk",
                        "job_id": job_id,
                        "data": pending.decode(errors="replace"),
                    }
                )
        except httpx.HTTPError:
            return
        finally:
            with trio.CancelScope(shield=True):  # closed even when the test ends it
                await response.aclose()
        await send({"type": "proxy_done", "job_id": job_id})

    def _lie(self, chunk: bytes) -> bytes:
        if self.usage_factor == 1.0 or b'"completion_tokens"' not in chunk:
            return chunk
        text = chunk.decode()
        out = []
        for line in text.split("\n"):
            if line.startswith("data: {") and '"usage"' in line:
                data = json.loads(line[6:])
                if data.get("usage"):
                    data["usage"]["completion_tokens"] = int(
                        data["usage"]["completion_tokens"] * self.usage_factor
                    )
                line = "data: " + json.dumps(data)
            out.append(line)
        return "\n".join(out).encode()


@asynccontextmanager
async def stock_agent(nursery: trio.Nursery, agent: StockAgent) -> AsyncIterator[StockAgent]:
    await nursery.start(agent.run)
    yield agent


def main() -> None:
    """The emulator in its own process, as a provider runs the Go agent:
    ``python -m tests.stock_agent GATEWAY ENGINE MODEL [...] --piece N``."""
    import argparse

    parser = argparse.ArgumentParser(prog="stock_agent")
    parser.add_argument("gateway")
    parser.add_argument("engine_url")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--node-id", default=str(uuid.uuid4()))
    parser.add_argument("--piece", type=int, default=4096)
    parser.add_argument("--lightning-address", default="")
    args = parser.parse_args()
    agent = StockAgent(
        args.gateway,
        args.engine_url,
        args.models,
        node_id=args.node_id,
        piece=args.piece,
        lightning_address=args.lightning_address,
    )
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(agent.run)


if __name__ == "__main__":
    main()
