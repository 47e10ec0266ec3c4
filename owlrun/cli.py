"""``owlrun``: serve RouteCat jobs from a local Ollama or OpenAI-compatible engine.

    owlrun --gateway https://route.cat --lightning-address you@domain \\
           --ollama-url http://localhost:11434
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

from owlrun.agent import Agent
from owlrun.engines import Engine, OllamaEngine, OpenAIEngine
from owlrun.errors import RefusedError
from owlrun.identity import default_path, load_or_create

log = logging.getLogger("owlrun")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="owlrun",
        description="Earn sats serving AI inference for a RouteCat gateway.",
    )
    p.add_argument(
        "--gateway",
        required=True,
        action="append",
        help="gateway base URL, e.g. https://route.cat; give several (repeated or"
        " comma-separated) for replicas: the agent fails over between them",
    )
    p.add_argument("--lightning-address", default="", help="where payouts go (LUD-16, you@domain)")
    p.add_argument("--backend", choices=["ollama", "openai"], default="ollama")
    p.add_argument("--ollama-url", default="http://localhost:11434", help="Ollama base URL")
    p.add_argument(
        "--backend-url",
        help="OpenAI-compatible engine base URL (llama.cpp, vLLM, LM Studio) for --backend openai",
    )
    p.add_argument("--max-jobs", type=int, default=1, help="jobs served at once (default 1)")
    p.add_argument("--models", default="", help="comma-separated allow-list of models to serve")
    p.add_argument("--name", default="", help="a public display name for this node")
    p.add_argument("--payout-threshold", type=int, default=None, help="payout threshold in sats")
    p.add_argument(
        "--config", type=Path, default=None, help=f"identity file (default {default_path()})"
    )
    p.add_argument(
        "--batch-window-ms",
        type=_window_ms,
        default=5.0,
        help="tokens that follow a sent chunk within this many ms leave together in one"
        " frame (0 to 100, default 5; 0 sends each token at once)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def _window_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("between 0 and 100 ms")
    return value


def make_engine(args: argparse.Namespace, client: httpx.AsyncClient) -> Engine:
    if args.backend == "openai":
        if not args.backend_url:
            raise SystemExit("owlrun: --backend openai needs --backend-url")
        import os

        return OpenAIEngine(
            args.backend_url.rstrip("/"), client, os.environ.get("OWLRUN_BACKEND_API_KEY", "")
        )
    return OllamaEngine(args.ollama_url.rstrip("/"), client)


async def main_async(args: argparse.Namespace) -> int:
    identity = load_or_create(args.config or default_path())
    timeout = httpx.Timeout(connect=10, read=None, write=30, pool=30)
    async with httpx.AsyncClient(timeout=timeout) as client:
        agent = Agent(
            gateway=",".join(args.gateway),
            identity=identity,
            engine=make_engine(args, client),
            max_jobs=max(1, args.max_jobs),
            batch_window=args.batch_window_ms / 1000,
            allowed_models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            name=args.name,
            payout_address=args.lightning_address,
            payout_threshold_sats=args.payout_threshold,
        )
        log.info("owlrun node %s starting", identity.node_id)
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        log.info("stopping: no new jobs, finishing in-flight ones")
                        await agent.drain()
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            try:
                await agent.run()
            except RefusedError as exc:
                log.error("the gateway refused this node: %s", exc.reason)
                return 2
            nursery.cancel_scope.cancel()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return trio.run(main_async, args)


if __name__ == "__main__":
    sys.exit(main())
