"""Child processes in tests and benchmarks: who is below whom, alive or not, and
stopping one when the test ends (from /proc: Linux)."""

from __future__ import annotations

import os
from pathlib import Path

import trio


def tree(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {pid}, {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


async def stop_process(process: trio.Process) -> None:
    """A child that lives as long as the test and no longer (killed when the test ends
    first), its output pipe closed."""
    try:
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


async def terminate(process: trio.Process, grace: float = 10) -> None:
    """Ask a child to stop (SIGTERM) and kill it if it is still there after ``grace``
    seconds."""
    if process.returncode is None:
        process.terminate()
    with trio.move_on_after(grace):
        await process.wait()
    if process.returncode is None:
        process.kill()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
