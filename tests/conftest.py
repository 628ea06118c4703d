"""Fixtures shared by every test directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def world_pool() -> Iterator[object]:
    """One pool of warm rank processes for the whole session (torch imported once)."""
    from distckpt.testing.pool import WorldPool

    with WorldPool(max_ranks=32) as p:  # processes start lazily, as a world needs them
        yield p
