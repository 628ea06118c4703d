"""Shared test helpers: a trivial Stateful and threaded-world runners."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from distckpt.testing import ThreadComm, ThreadWorld, run_threads
from distckpt.testing.strategies import mesh_partition


class Box:
    """A Stateful holding whatever state it is given."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


class CountingBox(Box):
    """A Box that counts its ``state_dict()`` calls."""

    def __init__(self, state: Any) -> None:
        super().__init__(state)
        self.calls = 0

    def state_dict(self) -> Any:
        self.calls += 1
        return super().state_dict()


def threads(world_size: int, fn: Callable[[ThreadComm], Any], nodes: Sequence[int] | None = None,
            timeout: float = 20.0) -> list[Any]:
    """Run ``fn`` on a threaded world; results (or exceptions) by rank."""
    return run_threads(ThreadWorld(world_size, nodes=nodes, timeout=timeout), fn)


def all_ok(results: list[Any]) -> list[Any]:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results


def mesh_groups(rank: int, dims: Sequence[tuple[str, int]]) -> dict[str, tuple[int, ...]]:
    """Groups of a row-major mesh: for each dimension, the ranks that differ only along it."""
    sizes = [s for _, s in dims]
    world = math.prod(sizes)
    return {name: next(tuple(g) for g in mesh_partition(world, sizes, axis) if rank in g)
            for axis, (name, _) in enumerate(dims)}
