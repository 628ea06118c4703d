"""Threaded worlds: testing declarations and trainers without processes.

:func:`run_threads` runs one function per simulated rank in threads that share
a :class:`ThreadComm` world: real coordinator code, real files, no
torch.distributed. Process groups are plain tuples of global ranks, node
membership is given explicitly. Used by distckpt's own property tests; handy
for a trainer's unit tests too. Real multi-process behaviour (gloo, dead
peers, timeouts) needs real processes: see the project's harness.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import CollectiveTimeoutError

__all__ = ["ThreadComm", "ThreadWorld", "run_threads"]

T = TypeVar("T")


class ThreadWorld:
    """Shared state of one simulated world: a barrier-based all-gather."""

    def __init__(self, world_size: int, nodes: Sequence[int] | None = None, timeout: float = 30.0) -> None:
        if world_size < 1:
            raise ValueError("world_size must be positive")
        self.world_size = world_size
        self.nodes = list(nodes) if nodes is not None else [0] * world_size
        if len(self.nodes) != world_size:
            raise ValueError("nodes must give one node index per rank")
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self._phases: list[str | None] = [None] * world_size
        self._children: list[ThreadWorld] = []
        self._lock = threading.Lock()

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def child(self, index: int) -> ThreadWorld:
        """The ``index``-th independent channel of this world (created on first use)."""
        with self._lock:
            while len(self._children) <= index:
                self._children.append(ThreadWorld(self.world_size, self.nodes, self.timeout))
            return self._children[index]


class ThreadComm:
    """One rank's view of a :class:`ThreadWorld`; implements every :mod:`distckpt.transport` protocol."""

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.world_size = world.world_size
        self._forks = 0

    #: A threaded world's channel never needs replacing (:class:`~distckpt.transport.ForkingComm`).
    broken = False

    def fork(self) -> ThreadComm:
        """An independent channel among the same ranks (ranks fork in the same order)."""
        child = self.world.child(self._forks)
        self._forks += 1
        return child.comm(self.rank)

    def node_id(self) -> str:
        return f"node={self.world.nodes[self.rank]}"

    def group_members(self, group: Any) -> tuple[int, ...]:
        return tuple(sorted(group))

    def broadcast(self, obj: Any, phase: str) -> Any:
        return self.all_gather(obj, phase)[0]

    def broadcast_in_sets(self, sets: Sequence[tuple[int, ...]], tensors: Sequence[Any], phase: str) -> None:
        """Send ``tensors`` from the lowest rank of this rank's set to its members (via an all-gather)."""
        mine = next(m for m in sets if self.rank in m)
        sent = self.all_gather(list(tensors) if self.rank == min(mine) else None, phase)
        if self.rank != min(mine):
            for target, source in zip(tensors, sent[min(mine)], strict=True):
                target.copy_(source)

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        w = self.world
        try:
            w._barrier.wait(w.timeout)
            w._slots[self.rank] = obj
            w._phases[self.rank] = phase
            w._barrier.wait(w.timeout)
            out = list(w._slots)
            w._barrier.wait(w.timeout)
        except threading.BrokenBarrierError:
            w._barrier.abort()
            raise CollectiveTimeoutError(
                f"checkpoint '{phase}' step could not complete: a peer is unreachable",
                failures={self.rank: f"'{phase}' collective broken (a peer failed or timed out)"},
                phase=phase,
            ) from None
        return out


def run_threads(world: ThreadWorld, fn: Callable[[ThreadComm], T]) -> list[T | BaseException]:
    """Run ``fn(comm)`` on every rank of ``world`` in threads; results or exceptions by rank."""
    results: list[Any] = [None] * world.world_size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(world.comm(rank))
        except BaseException as exc:  # returned to the caller
            results[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(world.world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(world.timeout * 4)
    return results
