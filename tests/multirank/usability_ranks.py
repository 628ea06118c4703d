"""Rank-side functions of tests/multirank/test_usability_worlds.py (module level, so they pickle)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from distckpt import CheckpointCoordinator, StateComponent
from tests.helpers import Box


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


def late_rank(ctx: Any, late: int, delay: float) -> list[tuple[str, str]]:
    """Every rank saves; rank ``late`` arrives ``delay`` seconds after the others.
    Returns the distckpt log lines (level, text) this rank saw, with warnings after 0.3 s."""
    os.environ["DISTCKPT_WAIT_WARNING_S"] = "0.3"
    logger = logging.getLogger("distckpt")
    handler = _Collect()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        coord = CheckpointCoordinator([StateComponent("s", Box({"w": torch.ones(2)}), "per_rank")],
                                      output_dir=ctx.workdir, timeout=60)
        if ctx.rank == late:
            time.sleep(delay)
        coord.save_checkpoint()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        os.environ.pop("DISTCKPT_WAIT_WARNING_S", None)
    return handler.lines
