"""Operator and provider commands as processes: routecat nodes, owlrun on SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import trio

from routecat.api.admin import socket_path
from routecat.cli import build_parser
from tests.clients import chat, wait_for
from tests.fakes import Knobs
from tests.servers import start_network


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "routecat", *args], capture_output=True, text=True, timeout=60
    )


async def test_nodes_list_and_ban(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(30):
        net = await start_network(nursery, tmp_path, nodes=2)
        db = net.gateway.config.database
        sock = socket_path(net.gateway.config)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # On PostgreSQL the list is the replicas' node directory, published within a
        # cluster round of a node's arrival: asked again until both are in it.
        for _ in range(20):
            out = await trio.to_thread.run_sync(lambda: run_cli("nodes", "list", "--database", db))
            assert out.returncode == 0, out.stderr
            if "2 nodes online" in out.stdout:
                break
            await trio.sleep(0.25)
        assert "2 nodes online" in out.stdout
        for node in net.nodes:
            assert node.id in out.stdout
        victim = net.nodes[0]
        out = await trio.to_thread.run_sync(
            lambda: run_cli("nodes", "ban", victim.id, "cheating", "--database", db)
        )
        assert out.returncode == 0, out.stderr
        await wait_for(lambda: victim.id not in net.gateway.gw.registry.nodes)
        # It cannot come back: its reconnects are refused for good.
        await victim.stopped.wait()
        assert "banned" in victim.refused[0].reason
        assert set(net.gateway.gw.registry.nodes) == {net.nodes[1].id}
        out = await trio.to_thread.run_sync(
            lambda: run_cli("nodes", "ban", "node_nobody", "x", "--database", db)
        )
        assert out.returncode == 1


async def test_nodes_list_without_gateway(tmp_path: Path) -> None:
    out = await trio.to_thread.run_sync(
        lambda: run_cli("nodes", "list", "--database", str(tmp_path / "none.db"))
    )
    assert out.returncode == 1
    assert "no gateway is running" in out.stderr


async def test_owlrun_sigterm_finishes_in_flight_job(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(40):
        net = await start_network(nursery, tmp_path, nodes=0, knobs=Knobs(delay=0.1, repeat=5))
        identity = tmp_path / "node.json"
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "owlrun",
                "--gateway",
                net.url,
                "--ollama-url",
                net.engine.url,
                "--lightning-address",
                "me@example.com",
                "--config",
                str(identity),
                "--max-jobs",
                "2",
            ],
            stderr=subprocess.PIPE,
        )
        try:
            await wait_for(lambda: net.gateway.gw.registry.nodes, timeout=15)
            assert stat.S_IMODE(identity.stat().st_mode) == 0o600
            saved = json.loads(identity.read_text())
            assert saved["node_id"] in net.gateway.gw.registry.nodes
            rows = await net.gateway.gw.store.read(
                lambda db: db.execute("SELECT secret_hash FROM nodes").fetchall()
            )
            assert saved["secret"] not in rows[0][0]
            async with net.client() as c:
                answers: list[httpx.Response] = []

                async def ask() -> None:
                    answers.append(await c.post("/v1/chat/completions", json=chat("drain me")))

                async with trio.open_nursery() as inner:
                    inner.start_soon(ask)
                    await wait_for(lambda: net.engine.active == 1)
                    proc.send_signal(signal.SIGTERM)
                    await wait_for(
                        lambda: any(n.draining for n in net.gateway.gw.registry.nodes.values()),
                        timeout=5,
                    )
                assert answers[0].status_code == 200
                assert (
                    answers[0].json()["choices"][0]["message"]["content"]
                    == "You said: drain me" * 5
                )
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        log = (await proc.stderr.receive_some(1 << 20)).decode()
        assert "job chatcmpl-" in log
        assert saved["secret"] not in log


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and subcommand of ``routecat``, with its parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_option_is_described_in_words_and_commands_list_only_theirs() -> None:
    commands = dict(_commands(build_parser()))
    assert ("demo",) in commands and ("keys", "credit") in commands
    for path, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # its choices are checked as commands
            words = re.findall(r"[a-z]{2,}", action.help or "")
            assert len(words) >= 2 and "default" not in words[:1], (path, action.dest, action.help)
        assert parser.format_help()  # renders
    serve = commands[("serve",)].format_help()
    assert "--first-token-timeout" in serve and "--owlrun-compat" in serve
    for path in [("keys", "credit"), ("ledger", "check"), ("payouts", "list"), ("demo",)]:
        shown = commands[path].format_help()
        assert "--first-token-timeout" not in shown and "--lnbits-url" not in shown, path
    assert "--database" in commands[("keys", "credit")].format_help()
    assert "--admin-socket" in commands[("wallet", "pay")].format_help()
    # And the process answers --help for each, with exit status 0.
    out = run_cli("keys", "credit", "--help")
    assert out.returncode == 0 and "credit a key from operator equity" in out.stdout
