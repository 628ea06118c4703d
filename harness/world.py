"""Moved: the warm world pool is :mod:`distckpt.testing.pool` (issue 13, test infrastructure
apart from the product). This alias keeps ``from harness.world import ...`` working for code
written before the move; new code imports from ``distckpt.testing``.
"""

from __future__ import annotations

from distckpt.testing.pool import DEFAULT_PRELOAD, WorldPool
from distckpt.testing.worldspec import RankContext, RankOutcome, WorldSpec, WorldTimeout, rank_env

__all__ = ["DEFAULT_PRELOAD", "RankContext", "RankOutcome", "WorldPool", "WorldSpec", "WorldTimeout", "rank_env"]
