"""A sharing pattern of your own: one replica set per local rank.

A job that runs pipeline stage ``k`` on local rank ``k`` of every node, and is
data parallel across nodes, holds identical state on the ranks that share a
local rank: local rank 0 of every node holds stage 0, local rank 1 holds
stage 1, and so on. Its model is ``PerLocalRank()``: one file per stage,
written by the stage's rank on the first node, validated across nodes.

Nodes may differ in size: local rank 2 of a node of three ranks has no peer on
a node of two, so it is a set of its own.

Import this module (or name it in a scenario file's ``imports``) in every
process that saves or loads the pattern; ``@register_pattern`` makes the kind
``per_local_rank`` known to the manifest reader.
"""

from __future__ import annotations

from collections.abc import Sequence

from distckpt import Pattern, Topology, register_pattern


@register_pattern
class PerLocalRank(Pattern):
    """Ranks holding the same local rank on their nodes share state."""

    kind = "per_local_rank"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        sets: dict[int, list[int]] = {}
        for rank in range(topology.world_size):
            sets.setdefault(topology.local_rank(rank), []).append(rank)
        return list(sets.values())

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"local-{index:03d}"
