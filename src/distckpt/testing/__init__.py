"""Test kit for trainers and sharing patterns (``pip install distckpt[testing]``).

- :func:`run_threads`, :class:`ThreadWorld`, :class:`ThreadComm`: a world of
  ranks as threads in one process (real coordinator, real files, no
  torch.distributed), for a trainer's unit tests.
- :func:`check_pattern`: property-test a sharing pattern over drawn topologies
  and state dicts, on threaded worlds or real gloo worlds of warm processes.
- :func:`topologies`, :func:`state_dicts`: the hypothesis strategies it draws from.
- :mod:`distckpt.testing.pool`: :class:`~distckpt.testing.pool.WorldPool`, warm rank
  processes that run a function as a real gloo world of any shape
  (:class:`~distckpt.testing.worldspec.WorldSpec`, nodes of equal or uneven sizes) with
  the environment torchrun gives real jobs, a deadline per world and stack dumps of
  stuck ranks; the harness and distckpt's own tests run in it.
- :class:`~distckpt.testing.declare.Declaration`: one component's declaration as plain
  data (key, pattern, params, validation, required), shared by the harness's scenario
  files and the tests.

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
