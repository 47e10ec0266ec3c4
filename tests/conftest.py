"""Fixtures only; the servers they start live in ``tests/servers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.servers import Running, make_config, start_gateway


@pytest.fixture
async def gateway(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_gateway(nursery, make_config(tmp_path))
    yield running
    running.stop.set()


@pytest.fixture
async def client(gateway: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway.client() as c:
        yield c
