from __future__ import annotations

import pytest

from harness.world import WorldPool


@pytest.fixture
def pool(world_pool: WorldPool) -> WorldPool:
    return world_pool
