from __future__ import annotations

import pytest

from distckpt.testing.pool import WorldPool


@pytest.fixture
def pool(world_pool: WorldPool) -> WorldPool:
    return world_pool
