"""The live gateway the property tests share within a module (``tests.servers.LiveGateway``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import LiveGateway


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    gateway = LiveGateway(tmp_path_factory.mktemp("live"))
    gateway.start()
    yield gateway
    gateway.stop()
