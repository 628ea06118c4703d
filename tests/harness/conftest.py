"""Fixtures for the harness's own tests: one warm world pool for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.world import WorldPool


@pytest.fixture(scope="session")
def world_pool() -> Iterator[WorldPool]:
    """A pool of up to 8 warm rank processes shared by every harness test."""
    with WorldPool(max_ranks=8) as pool:
        yield pool
