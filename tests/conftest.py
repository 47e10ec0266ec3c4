"""Fixtures only; the servers they start live in ``tests/servers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.servers import Running, make_config, on_postgres, start_gateway


@pytest.fixture
async def gateway(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_gateway(nursery, make_config(tmp_path))
    yield running
    running.stop.set()


@pytest.fixture
async def client(gateway: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway.client() as c:
        yield c


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Backend-specific tests are skipped, each with its reason, on the other backend."""
    if on_postgres():
        marker, reason = "sqlite_only", "the SQLite store's own mechanics (suite on PostgreSQL)"
    else:
        marker, reason = "postgres_only", "replicas need PostgreSQL: run nox -s postgres"
    for item in items:
        if marker in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))
