"""Test kit for trainers and sharing patterns (``pip install distckpt[testing]``).

- :func:`run_threads`, :class:`ThreadWorld`, :class:`ThreadComm`: a world of
  ranks as threads in one process (real coordinator, real files, no
  torch.distributed), for a trainer's unit tests.
- :func:`check_pattern`: property-test a sharing pattern over drawn topologies
  and state dicts, on threaded worlds or real gloo worlds of warm processes.
- :func:`topologies`, :func:`state_dicts`: the hypothesis strategies it draws from.

The kit needs ``hypothesis`` (the ``testing`` extra); the threaded worlds do not,
so the kit's names are imported on first use.
"""

from __future__ import annotations

from typing import Any

from .worlds import ThreadComm, ThreadWorld, run_threads

__all__ = ["ThreadComm", "ThreadWorld", "check_pattern", "run_threads", "state_dicts", "topologies"]


def __getattr__(name: str) -> Any:
    if name == "check_pattern":
        from .kit import check_pattern

        return check_pattern
    if name in ("topologies", "state_dicts"):
        from . import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'distckpt.testing' has no attribute {name!r}")
