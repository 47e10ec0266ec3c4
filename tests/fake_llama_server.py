"""The fake engine in its own process, started with llama-cpp-python server's arguments:
a stand-in for ``routecat demo``'s engine child in the fast tests.

    python -m tests.fake_llama_server --model M --model_alias NAME --port P [...]
"""

from __future__ import annotations

import argparse
import functools

import trio

from tests.fakes import FakeEngine, Knobs, serve_app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_alias", required=True)
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()  # the rest is llama.cpp's own
    engine = FakeEngine(Knobs(models=[args.model_alias]))
    trio.run(functools.partial(serve_app, engine.app(), port=args.port))


if __name__ == "__main__":
    main()
