"""Quiet, useful log lines: INFO from rank 0 only, every line with its rank and phase.

Called by the coordinator and :mod:`distckpt.progress` for their progress and
summary lines. Rank 0 logs at the level asked for; every other rank logs the
same line at DEBUG, so a job at INFO prints each event once, not once per
rank, and ``logging.getLogger("distckpt").setLevel(logging.DEBUG)`` shows every
rank's view. Warnings and errors are not routed through here: they are logged
on the rank that sees them. Local, never raises for a closed stream (that is
:mod:`logging`'s business).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["log", "note", "prefix"]

log = logging.getLogger("distckpt")


def prefix(rank: int, phase: str) -> str:
    """``"distckpt[rank 3] write: "``: the head of every line. Pure."""
    return f"distckpt[rank {rank}] {phase}: "


def note(rank: int, phase: str, message: str, *args: Any, level: int = logging.INFO) -> None:
    """Log ``message % args`` at ``level`` on rank 0, at DEBUG on every other rank."""
    effective = level if rank == 0 else logging.DEBUG
    if log.isEnabledFor(effective):
        log.log(effective, prefix(rank, phase) + message, *args)
