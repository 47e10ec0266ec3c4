from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.lnbits import LNbits, start_lnbits


@pytest.fixture(scope="session")
def lnbits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LNbits]:
    yield from start_lnbits(tmp_path_factory.mktemp("lnbits"))
