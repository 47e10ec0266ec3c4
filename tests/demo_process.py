"""``routecat demo`` as a user runs it: its own process, read from its printed lines,
stopped with SIGINT (the Ctrl-C of a terminal)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import attrs
import trio

from routecat.demo import READY
from tests.procs import stop_process, tree


@attrs.define(eq=False)
class RunningDemo:
    process: trio.Process
    lines: list[str] = attrs.Factory(list)
    url: str = ""
    key: str = ""
    model: str = ""
    ready: trio.Event = attrs.Factory(trio.Event)
    ended: trio.Event = attrs.Factory(trio.Event)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def descendants(self) -> set[int]:
        """Every process below the demo, from /proc (its engine, and anything it ran)."""
        return tree(self.process.pid) - {self.process.pid}

    async def interrupt(self, within: float = 10) -> int:
        """SIGINT, as Ctrl-C sends it; the exit status, which must come ``within``."""
        self.process.send_signal(signal.SIGINT)
        with trio.fail_after(within):
            return await self.process.wait()


async def start_demo(
    nursery: trio.Nursery,
    tmp_path: Path,
    *args: str,
    cache: Path | None = None,
    ready_within: float,
    env: dict[str, str] | None = None,
) -> RunningDemo:
    """Run ``routecat demo ARGS`` on a free port, its database in ``tmp_path`` (and its
    cache too unless given), and wait for its ready banner."""
    where = ["--database", str(tmp_path / "demo.db"), "--cache-dir", str(cache or tmp_path)]
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "routecat", "demo", "--port", "0", *where, *args],
        stdout=-1,  # subprocess.PIPE
        env={**os.environ, **(env or {})},
    )
    demo = RunningDemo(process)

    async def read() -> None:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                demo.lines.append(line)
                if line.startswith(READY):
                    demo.url = line.split(": ", 1)[1].strip()
                if line.strip().startswith("API key"):
                    demo.key = line.split()[2]
                if line.strip().startswith("Model "):
                    demo.model = line.split()[1].rstrip(",")
                if line.startswith("Every job:"):
                    demo.ready.set()
        demo.ended.set()

    nursery.start_soon(read)
    nursery.start_soon(stop_process, process)
    with trio.move_on_after(ready_within):
        async with trio.open_nursery() as waiting:

            async def ended() -> None:
                await demo.ended.wait()
                waiting.cancel_scope.cancel()

            waiting.start_soon(ended)
            await demo.ready.wait()
            waiting.cancel_scope.cancel()
    if not demo.ready.is_set():
        process.kill()
        raise AssertionError("the demo did not print its banner:\n" + demo.text)
    assert re.fullmatch(r"rc_[A-Za-z0-9_-]+", demo.key), demo.text
    return demo
