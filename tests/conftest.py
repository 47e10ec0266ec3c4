from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from routecat.config import Config
from routecat.server import serve_gateway


@attrs.define
class Running:
    url: str
    stop: trio.Event
    config: Config

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "database": str(tmp_path / "routecat.db"),
        "port": 0,
        "register_limit_per_hour": 1000,
        "log_level": "WARNING",
        "btc_usd": "100000",
    }
    settings.update(overrides)
    from routecat.config import load_config

    return load_config(flags=settings, environ={})


async def start_gateway(nursery: trio.Nursery, config: Config) -> Running:
    stop = trio.Event()
    url = await nursery.start(functools.partial(serve_gateway, config, stop=stop))
    return Running(url, stop, config)


@pytest.fixture
async def gateway(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_gateway(nursery, make_config(tmp_path))
    yield running
    running.stop.set()


@pytest.fixture
async def client(gateway: Running) -> AsyncIterator[httpx.AsyncClient]:
    async with gateway.client() as c:
        yield c


async def register(client: httpx.AsyncClient, name: str = "test") -> str:
    r = await client.post("/v1/auth/register", json={"name": name})
    assert r.status_code == 200, r.text
    key = r.json()["api_key"]
    assert isinstance(key, str)
    return key


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in response.text
    return dict(error)
