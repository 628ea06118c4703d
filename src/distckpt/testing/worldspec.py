"""The shape of a process world and what its ranks report (plain data, no processes).

Who uses it: :class:`~distckpt.testing.pool.WorldPool` (parent side), its rank
processes (:mod:`distckpt.testing._pool_rank`) and the harness. Nothing here
is collective or does I/O.

- :class:`WorldSpec`: nodes of equal or uneven sizes on this machine;
- :func:`rank_env`: the environment torchrun gives each rank of such a world;
- :class:`RankContext`: what a rank function learns about its place;
- :class:`RankOutcome` and :class:`WorldTimeout`: what came back.

Ranks are numbered node by node, as torchrun numbers the workers of agents
of different sizes: node ``n`` holds the ``sizes[n]`` ranks after those of
nodes ``0 .. n-1``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RankContext",
    "RankOutcome",
    "WorldSpec",
    "WorldTimeout",
    "normalise_sizes",
    "place_of",
    "rank_env",
    "sizes_of",
]


def normalise_sizes(nodes: int | None, procs_per_node: Any, what: str = "WorldSpec") -> tuple[int, int | tuple[int, ...]]:
    """``(nodes, procs_per_node)`` checked and in canonical form; ``ValueError`` naming ``what``.

    ``procs_per_node`` is a positive int (every node that size) or a sequence of
    positive ints (one per node; ``nodes`` is then its length, or must equal it).
    A sequence of equal sizes becomes that int, so ``[2, 2]`` and ``2`` on two
    nodes describe the same world.
    """
    if isinstance(procs_per_node, (list, tuple)):
        sizes = tuple(procs_per_node)
        if not sizes:
            raise ValueError(f"{what}.procs_per_node: give at least one node size")
        for size in sizes:
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{what}.procs_per_node: node sizes must be positive ints, got {size!r}")
        if nodes is not None and nodes != len(sizes):
            raise ValueError(f"{what}.nodes is {nodes} but procs_per_node lists {len(sizes)} node sizes")
        if len(set(sizes)) == 1:
            return len(sizes), sizes[0]
        return len(sizes), sizes
    if not isinstance(procs_per_node, int) or isinstance(procs_per_node, bool) or procs_per_node < 1:
        raise ValueError(f"{what}.procs_per_node must be a positive int or a list of them, got {procs_per_node!r}")
    count = 1 if nodes is None else nodes
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{what}.nodes must be a positive int, got {nodes!r}")
    return count, procs_per_node


def sizes_of(nodes: int, procs_per_node: int | tuple[int, ...]) -> tuple[int, ...]:
    """The size of every node."""
    return procs_per_node if isinstance(procs_per_node, tuple) else (procs_per_node,) * nodes


def place_of(sizes: Sequence[int], rank: int) -> tuple[int, int]:
    """``(node, local rank)`` of ``rank`` when ranks are numbered node by node."""
    if rank < 0:
        raise ValueError(f"rank {rank} is negative")
    first = 0
    for node, size in enumerate(sizes):
        if rank < first + size:
            return node, rank - first
        first += size
    raise ValueError(f"rank {rank} is outside a world of {first} ranks")


@dataclass(frozen=True)
class WorldSpec:
    """The shape of one world: ``nodes`` simulated nodes of ``procs_per_node`` ranks each.

    ``procs_per_node`` is one size for every node or a tuple of sizes, one per
    node (``WorldSpec(procs_per_node=(3, 2, 1))``: three nodes, six ranks);
    ``nodes`` defaults to 1, or to the tuple's length. ``workdir`` is the
    directory shared by the world's ranks (a fresh temporary directory, removed
    after the world, when not given). ``env`` adds variables to every rank's
    environment for the duration of the world. Construction raises
    ``ValueError`` on a malformed shape.
    """

    nodes: int | None = None
    procs_per_node: int | tuple[int, ...] = 1
    workdir: str | os.PathLike[str] | None = None
    backend: str = "gloo"
    env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        nodes, ppn = normalise_sizes(self.nodes, self.procs_per_node)
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "procs_per_node", ppn)

    @property
    def node_sizes(self) -> tuple[int, ...]:
        """The number of ranks on each node."""
        assert self.nodes is not None
        return sizes_of(self.nodes, self.procs_per_node)

    @property
    def world_size(self) -> int:
        """Total number of ranks."""
        return sum(self.node_sizes)


@dataclass(frozen=True)
class RankContext:
    """What a rank function learns about its place in the world (its first argument).

    ``procs_per_node`` is as in the :class:`WorldSpec` (an int, or a tuple of
    node sizes); ``local_world_size`` is the size of this rank's own node.
    """

    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    nodes: int
    procs_per_node: int | tuple[int, ...]
    workdir: str
    backend: str = "gloo"
    timeout: float = 60.0
    run_id: str = ""
    local_world_size: int = 0

    def __post_init__(self) -> None:
        if self.local_world_size == 0:
            sizes = sizes_of(self.nodes, self.procs_per_node)
            object.__setattr__(self, "local_world_size", sizes[self.node_rank])


@dataclass
class RankOutcome:
    """What happened on one rank: a return value, an exception, or a process death."""

    rank: int
    ok: bool
    value: Any = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    exception: BaseException | None = None
    exit_code: int | None = None
    pid: int | None = None

    def describe(self) -> str:
        """A readable one-paragraph account of this rank's outcome."""
        if self.ok:
            return f"rank {self.rank}: ok -> {self.value!r}"
        head = f"rank {self.rank}: {self.error_type}: {self.error_message}"
        if self.traceback:
            return f"{head}\n{self.traceback}"
        return head


class WorldTimeout(Exception):
    """A world did not finish before its deadline.

    ``stacks`` maps each unfinished rank to its Python stack dump, ``outcomes``
    holds the outcome of every rank that did finish (``None`` for the others).
    """

    def __init__(
        self,
        message: str,
        stacks: Mapping[int, str] | None = None,
        outcomes: Sequence[RankOutcome | None] = (),
    ) -> None:
        super().__init__(message)
        self.stacks: dict[int, str] = dict(stacks or {})
        self.outcomes: list[RankOutcome | None] = list(outcomes)


def rank_env(
    spec: WorldSpec, rank: int, master_addr: str, master_port: int, run_id: str
) -> dict[str, str]:
    """The environment torchrun gives ``rank`` of a world shaped like ``spec``.

    As torchrun does for agents of different sizes: global ranks are numbered
    agent (node) by agent, ``LOCAL_WORLD_SIZE`` is the size of the rank's own
    node, ``GROUP_RANK``/``GROUP_WORLD_SIZE`` are its node and the number of
    nodes, and ``ROLE_RANK``/``ROLE_WORLD_SIZE`` equal the global ones (one
    role). ``MASTER_ADDR``/``MASTER_PORT`` are set as torchrun sets them, but
    the pool's ranks rendezvous through a file store, so nothing listens there.
    """
    sizes = spec.node_sizes
    node, local = place_of(sizes, rank)
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local),
        "WORLD_SIZE": str(spec.world_size),
        "LOCAL_WORLD_SIZE": str(sizes[node]),
        "GROUP_RANK": str(node),
        "GROUP_WORLD_SIZE": str(len(sizes)),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(spec.world_size),
        "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.update(spec.env)
    return env
