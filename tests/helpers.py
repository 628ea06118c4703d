"""Shared test helpers: a trivial Stateful and threaded-world runners."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from distckpt.testing import ThreadComm, ThreadWorld, run_threads


class Box:
    """A Stateful holding whatever state it is given."""

    def __init__(self, state: Any = None) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


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
    coords = []
    rest = rank
    for size in reversed(sizes):
        coords.append(rest % size)
        rest //= size
    coords.reverse()
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    out = {}
    for d, (name, size) in enumerate(dims):
        base = rank - coords[d] * strides[d]
        out[name] = tuple(base + i * strides[d] for i in range(size))
    return out
