"""A bench provider in its own process: a fast fake engine plus one owlrun agent.

    python -m tests.bench_node GATEWAY_URL

Prints ``ENGINE <url>`` once the engine listens and ``READY`` once the agent is in.
Models: ``fast:1b`` (a short answer), ``long64:1b`` (64 chunks), ``stall:1b``
(one chunk, then silence: for counting open streams).
"""

from __future__ import annotations

import secrets
import sys

import httpx
import trio

from owlrun.agent import Agent
from owlrun.engines import OpenAIEngine
from owlrun.identity import Identity
from tests.fakes import Knobs, start_engine


async def main(gateway: str) -> None:
    async with trio.open_nursery() as nursery:
        engine = await start_engine(
            nursery, Knobs(models=["fast:1b"], reply=["Hello", " there", "!"])
        )
        engine.model_knobs["long64:1b"] = Knobs(reply=["tok"] * 64)
        engine.model_knobs["stall:1b"] = Knobs(reply=["first"], stall_after=1, repeat=2)
        print("ENGINE", engine.url, flush=True)
        limits = httpx.Limits(max_connections=4000, max_keepalive_connections=200)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits) as client:
            identity = Identity("node_bench" + secrets.token_hex(4), secrets.token_urlsafe(24))
            agent = Agent(gateway, identity, OpenAIEngine(engine.url, client), max_jobs=2000)
            await nursery.start(agent.run)
            print("READY", flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
