from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.world import WorldPool


@pytest.fixture(scope="session")
def pool() -> Iterator[WorldPool]:
    with WorldPool(max_ranks=8) as p:
        yield p
