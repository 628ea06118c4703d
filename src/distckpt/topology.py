"""Topology: how the world's ranks are split into nodes and named groups.

Pure module. A :class:`Topology` is built from what every rank reported about
itself (its node identity and, per group name, the members of its group) and
checked to be a set of true partitions of ``range(world_size)``. Replica sets of
every sharing pattern are derived from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import TopologyMismatchError
from .patterns import SharingPattern, check_name

__all__ = ["Partition", "Topology", "replica_sets"]

#: A partition of ranks: sorted tuples, ordered by their lowest rank.
Partition = tuple[tuple[int, ...], ...]


def _normalise(sets: Sequence[Sequence[int]]) -> Partition:
    return tuple(sorted((tuple(sorted(s)) for s in sets), key=lambda s: s[0] if s else -1))


def _check_partition(world_size: int, sets: Partition, what: str) -> None:
    seen: dict[int, int] = {}
    for index, members in enumerate(sets):
        if not members:
            raise TopologyMismatchError(f"{what}: set {index} is empty")
        for rank in members:
            if not 0 <= rank < world_size:
                raise TopologyMismatchError(
                    f"{what}: rank {rank} is outside the world of {world_size} ranks"
                )
            if rank in seen:
                raise TopologyMismatchError(
                    f"{what}: rank {rank} belongs to two sets ({list(sets[seen[rank]])} and "
                    f"{list(members)}); groups of one name must be disjoint"
                )
            seen[rank] = index
    missing = sorted(set(range(world_size)) - set(seen))
    if missing:
        raise TopologyMismatchError(
            f"{what}: ranks {missing} belong to no set; groups of one name must cover the world"
        )


@dataclass(frozen=True)
class Topology:
    """Nodes and named groups of a world, each a partition of its ranks.

    ``nodes`` is ordered by lowest rank: node index ``i`` is ``nodes[i]``.
    ``groups`` maps a group name to its partition, ordered by lowest rank.
    Construction raises :class:`TopologyMismatchError` naming the partition and
    the offending ranks when a partition overlaps, misses ranks or strays outside.
    """

    world_size: int
    nodes: Partition
    groups: Mapping[str, Partition] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise TopologyMismatchError(f"world_size: expected a positive int, got {self.world_size!r}")
        nodes = _normalise(self.nodes)
        _check_partition(self.world_size, nodes, "nodes")
        object.__setattr__(self, "nodes", nodes)
        groups: dict[str, Partition] = {}
        for name in sorted(self.groups):
            check_name(name, field_name="process group name")
            part = _normalise(self.groups[name])
            _check_partition(self.world_size, part, f"process group {name!r}")
            groups[name] = part
        object.__setattr__(self, "groups", MappingProxyType(groups))

    @classmethod
    def from_reports(
        cls,
        node_ids: Sequence[str],
        group_members: Sequence[Mapping[str, Sequence[int]]],
    ) -> Topology:
        """Build the topology from every rank's report (index = global rank).

        ``node_ids[r]`` is rank ``r``'s node identity; ``group_members[r][name]``
        the global ranks of the group named ``name`` that rank ``r`` belongs to.
        Raises :class:`TopologyMismatchError` when ranks disagree about a group's
        members, a rank is missing from its own group, or a name is not declared
        by every rank.
        """
        world = len(node_ids)
        by_node: dict[str, list[int]] = {}
        for rank, node in enumerate(node_ids):
            by_node.setdefault(node, []).append(rank)
        names = {name for report in group_members for name in report}
        groups: dict[str, Partition] = {}
        for name in sorted(names):
            without = [r for r, report in enumerate(group_members) if name not in report]
            if without:
                raise TopologyMismatchError(
                    f"process group {name!r}: ranks {without} did not pass a group of that name"
                )
            claimed: dict[tuple[int, ...], list[int]] = {}
            for rank, report in enumerate(group_members):
                members = tuple(sorted(report[name]))
                if rank not in members:
                    raise TopologyMismatchError(
                        f"process group {name!r}: rank {rank} reported members {list(members)} "
                        "that do not include itself"
                    )
                claimed.setdefault(members, []).append(rank)
            for members, reporters in claimed.items():
                if sorted(reporters) != list(members):
                    raise TopologyMismatchError(
                        f"process group {name!r}: group {list(members)} was reported by ranks "
                        f"{sorted(reporters)}; every member must report the same members"
                    )
            groups[name] = tuple(claimed)
        return cls(world, tuple(tuple(v) for v in by_node.values()), groups)

    def node_index(self, rank: int) -> int:
        """Index of the node that holds ``rank``."""
        return _index_of(self.nodes, rank)

    def to_dict(self) -> dict[str, object]:
        """JSON form used in the manifest."""
        return {
            "nodes": [list(s) for s in self.nodes],
            "groups": {name: [list(s) for s in part] for name, part in self.groups.items()},
        }


def _index_of(sets: Partition, rank: int) -> int:
    for index, members in enumerate(sets):
        if rank in members:
            return index
    raise KeyError(rank)


def replica_sets(topology: Topology, pattern: SharingPattern, group_name: str | None = None) -> Partition:
    """The replica sets of ``pattern`` in ``topology``, ordered by lowest rank.

    ``GLOBAL`` and ``REPLICATED`` give one set of every rank; ``PER_RANK`` one
    set per rank; ``PER_NODE`` the nodes; ``PER_GROUP`` the partition named
    ``group_name``. Raises :class:`TopologyMismatchError` when a PER_GROUP
    component names a group the trainer did not pass.
    """
    world = tuple(range(topology.world_size))
    if pattern in (SharingPattern.GLOBAL, SharingPattern.REPLICATED):
        return (world,)
    if pattern is SharingPattern.PER_RANK:
        return tuple((r,) for r in world)
    if pattern is SharingPattern.PER_NODE:
        return topology.nodes
    if group_name is None or group_name not in topology.groups:
        known = ", ".join(sorted(topology.groups)) or "none"
        raise TopologyMismatchError(
            f"process group {group_name!r} is not among the groups passed to the coordinator "
            f"(known: {known}); pass it in process_groups"
        )
    return topology.groups[group_name]
