"""Topology: how the world's ranks are split into nodes and named groups.

Pure module (no I/O, no collectives). A :class:`Topology` is plain data: the
nodes and every named group partition of ``range(world_size)``. It is public:
sharing patterns (:mod:`distckpt.patterns`) read it to compute their replica
sets, and users build one by hand to test a pattern::

    Topology(nodes=[[0, 1, 2], [3, 4]], groups={"dp": [[0, 3], [1, 4], [2]]})

The coordinator builds it from what every rank reported about itself
(:meth:`Topology.from_reports`). :func:`check_partition` is the one place that
says whether a list of rank sets partitions a world.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from types import MappingProxyType

import numpy as np
import xxhash

from .errors import TopologyMismatchError
from .hashing import checksum_of
from .names import check_name

__all__ = ["Partition", "Topology", "check_partition", "group_key", "groups_digest", "join_partitions", "rank_text"]

#: A partition of ranks: sorted tuples, ordered by their lowest rank.
Partition = tuple[tuple[int, ...], ...]


def _normalise(sets: Iterable[Iterable[int]]) -> Partition:
    return tuple(sorted((tuple(sorted(s)) for s in sets), key=lambda s: s[0] if s else -1))


def check_partition(sets: Iterable[Iterable[int]], world_size: int, what: str) -> Partition:
    """Return ``sets`` sorted (each set, then the sets by lowest rank) if they partition
    ``range(world_size)``: non-empty, disjoint, covering, ranks in range.

    Pure. Called for node lists, group partitions and every pattern's replica
    sets. Raises :class:`TopologyMismatchError` naming ``what`` and the
    offending ranks otherwise.
    """
    try:
        raw = list(map(tuple, sets))
    except TypeError:
        raise TopologyMismatchError(f"{what}: expected a sequence of rank sequences, got {sets!r}") from None
    flat = list(chain.from_iterable(raw))
    if len(flat) == world_size and all(raw) and set(map(type, flat)) <= {int}:
        every = list(range(world_size))
        if flat == every:  # ranks in order: each set sorted, the sets by lowest rank (PER_RANK, nodes)
            return tuple(raw)
        if sorted(flat) == every:
            return _normalise(raw)  # the common case, checked at C speed; otherwise name what is wrong
    for listed in raw:
        for rank in listed:
            if isinstance(rank, bool) or not isinstance(rank, int):
                raise TopologyMismatchError(f"{what}: ranks must be ints, got {rank!r}")
    normal = _normalise(raw)
    seen: dict[int, int] = {}
    for index, members in enumerate(normal):
        if not members:
            raise TopologyMismatchError(f"{what}: set {index} is empty")
        for rank in members:
            if not 0 <= rank < world_size:
                raise TopologyMismatchError(f"{what}: rank {rank} is outside the world of {world_size} ranks")
            if rank in seen:
                raise TopologyMismatchError(
                    f"{what}: rank {rank} belongs to two sets ({list(normal[seen[rank]])} and "
                    f"{list(members)}); the sets must be disjoint"
                )
            seen[rank] = index
    if len(seen) != world_size:
        missing = sorted(set(range(world_size)) - set(seen))
        raise TopologyMismatchError(f"{what}: ranks {missing} belong to no set; the sets must cover the world")
    return normal


def _label_groups(labels: np.ndarray, keyed: bool = False) -> tuple[Partition, np.ndarray, np.ndarray]:
    """Ranks grouped by equal label: the partition (sorted, by lowest rank), each rank's set index,
    and with ``keyed`` each set's :func:`group_key` (uint64, partition order; else empty).

    Pure, vectorised: one stable sort; each set comes out in rank order, so its
    key is the xxh3-64 of its slice of the sorted ranks' bytes (one C call per
    set, no Python frame; :func:`group_key` of the same members gives the same value).
    """
    world = len(labels)
    if world == 0:
        return (), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    starts = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1))
    by_first = np.argsort(order[starts], kind="stable")  # sets by their lowest rank
    marks = np.zeros(world, dtype=np.int64)
    marks[starts] = 1
    rank_in_set = np.cumsum(marks) - 1  # set index (in label order) of every sorted position
    index_of = np.empty(len(starts), dtype=np.int64)
    index_of[by_first] = np.arange(len(starts))
    member_of = np.empty(world, dtype=np.int64)
    member_of[order] = index_of[rank_in_set]
    flat = tuple(order.tolist())
    lows = starts[by_first]
    highs = np.append(starts[1:], world)[by_first]
    spans = list(map(slice, lows.tolist(), highs.tolist()))
    sets = tuple(map(flat.__getitem__, spans))  # tuple slices: each set, in rank order
    keys = np.zeros(0, dtype=np.uint64)
    if keyed:  # group_key: xxh3-64 of the sorted members as native int64 ("q")
        data = order.astype(np.int64).tobytes()
        spans = list(map(slice, (lows * 8).tolist(), (highs * 8).tolist()))
        keys = np.fromiter(map(xxhash.xxh3_64_intdigest, map(data.__getitem__, spans)), dtype=np.uint64,
                           count=len(spans))
    return sets, member_of, keys


def join_partitions(world_size: int, partitions: Sequence[Partition]) -> Partition:
    """The finest partition that every one of ``partitions`` refines: the connected
    components of their union (ranks sharing a set in any of them end up together).

    Pure; linear in the number of ranks listed. With one partition it is that partition.
    """
    parent = list(range(world_size))

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for part in partitions:
        for members in part:
            first = root(members[0])
            for rank in members[1:]:
                other = root(rank)
                if other != first:
                    parent[max(other, first)] = min(other, first)
                    first = min(other, first)
    sets: dict[int, list[int]] = {}
    for rank in range(world_size):
        sets.setdefault(root(rank), []).append(rank)
    return _normalise(sets.values())


def group_key(members: Iterable[int]) -> int:
    """What a rank says about one of its groups in the first collective: the xxh3-64 digest of
    the group's sorted members, as an int (a few bytes, whatever the group's size). Pure.

    :meth:`Topology.from_compact` groups the ranks by it and checks it against
    the ranks that reported it, so every member must report the same members.
    """
    ordered = sorted(members)
    if any(r < 0 for r in ordered[:1]):
        return -1  # never the digest of a real group: refused by from_compact
    return int(checksum_of(array("q", ordered).tobytes(), "xxh3-64").partition(":")[2], 16)


def groups_digest(keys: Sequence[int]) -> int:
    """One 64-bit digest (xxh3) of a rank's :func:`group_key` values, in group-name order. Pure.

    A rank sends it with its groups' labels (:meth:`Topology.from_leaders`); a
    rank whose groups differ from what the labels imply gets another value
    unless two 64-bit digests collide.
    """
    return int(xxhash.xxh3_64_intdigest(struct.pack(f"<{len(keys)}Q", *(k & _MASK64 for k in keys))))


_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, init=False)
class Topology:
    """Nodes and named groups of a world, each a partition of its ranks.

    ``Topology(nodes=[[0, 1], [2, 3]], groups={"dp": [[0, 2], [1, 3]]})``;
    ``world_size`` is the number of ranks on the nodes (it may be given too,
    and ``Topology(4)`` is one node of four ranks). Nodes may differ in size.
    ``nodes`` is ordered by lowest rank: node index ``i`` is ``nodes[i]``;
    ``groups`` maps a group name to its partition, ordered by lowest rank.
    Construction raises :class:`TopologyMismatchError` naming the partition and
    the offending ranks when a partition overlaps, misses ranks or strays outside.
    """

    world_size: int
    nodes: Partition
    groups: Mapping[str, Partition] = field(default_factory=dict)
    _node_of: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __init__(
        self,
        world_size: int | None = None,
        nodes: Iterable[Iterable[int]] | None = None,
        groups: Mapping[str, Iterable[Iterable[int]]] | None = None,
    ) -> None:
        if nodes is None:
            if world_size is None:
                raise TopologyMismatchError("Topology needs nodes (a list of rank lists) or a world_size")
            nodes = [range(world_size)] if isinstance(world_size, int) and world_size > 0 else []
        node_sets = [list(s) for s in nodes]
        if world_size is None:
            world_size = sum(len(s) for s in node_sets)
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise TopologyMismatchError(f"world_size: expected a positive int, got {world_size!r}")
        normal = check_partition(node_sets, world_size, "nodes")
        checked: dict[str, Partition] = {}
        for name in sorted(groups or {}):
            check_name(name, field_name="process group name")
            checked[name] = check_partition((groups or {})[name], world_size, f"process group {name!r}")
        node_of = [0] * world_size
        for index, members in enumerate(normal):
            for rank in members:
                node_of[rank] = index
        object.__setattr__(self, "world_size", world_size)
        object.__setattr__(self, "nodes", normal)
        object.__setattr__(self, "groups", MappingProxyType(checked))
        object.__setattr__(self, "_node_of", tuple(node_of))

    @classmethod
    def from_reports(
        cls,
        node_ids: Sequence[str],
        group_members: Sequence[Mapping[str, Sequence[int]]],
    ) -> Topology:
        """Build the topology from every rank's report (index = global rank).

        Called by the coordinator on every rank after the plan all-gather.
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
            raw: dict[tuple[int, ...], list[int]] = {}
            for rank, report in enumerate(group_members):  # sort each distinct report once, not per rank
                raw.setdefault(tuple(report[name]), []).append(rank)
            claimed: dict[tuple[int, ...], list[int]] = {}
            for listed, ranks in raw.items():
                members = tuple(sorted(listed))
                member_set = set(members)
                for rank in ranks:
                    if rank not in member_set:
                        raise TopologyMismatchError(
                            f"process group {name!r}: rank {rank} reported members {list(members)} "
                            "that do not include itself"
                        )
                claimed.setdefault(members, []).extend(ranks)
            for members, reporters in claimed.items():
                reporters.sort()
                if reporters != list(members):
                    raise TopologyMismatchError(
                        f"process group {name!r}: group {list(members)} was reported by ranks "
                        f"{sorted(reporters)}; every member must report the same members"
                    )
            groups[name] = tuple(claimed)
        return cls(world, list(by_node.values()), groups)

    @classmethod
    def from_compact(cls, node_ids: Sequence[str], group_keys: Sequence[Mapping[str, int]]) -> Topology:
        """:meth:`from_reports` for compact reports: ``group_keys[r][name]`` is :func:`group_key`
        of the members rank ``r`` passed for the group ``name``.

        Called on every rank after the first collective of a save or load.
        Linear in the world size: ranks are grouped by the key they reported,
        and each group's key must be the digest of exactly the ranks that
        reported it (so every member reported the same members, itself
        included). Raises :class:`TopologyMismatchError` otherwise, or when a
        name is not passed by every rank.
        """
        world = len(node_ids)
        by_node: dict[str, list[int]] = {}
        for rank, node in enumerate(node_ids):
            by_node.setdefault(node, []).append(rank)
        names = {name for report in group_keys for name in report}
        groups: dict[str, list[list[int]]] = {}
        for name in sorted(names):
            without = [r for r, report in enumerate(group_keys) if name not in report]
            if without:
                raise TopologyMismatchError(
                    f"process group {name!r}: ranks {without[:20]} did not pass a group of that name"
                )
            claimed: dict[int, list[int]] = {}
            for rank, report in enumerate(group_keys):
                claimed.setdefault(report[name], []).append(rank)
            for key, reporters in claimed.items():
                if group_key(reporters) != key:
                    raise TopologyMismatchError(
                        f"process group {name!r}: ranks {reporters[:20]} reported one group but passed "
                        "different members (every member must pass the same members, itself included)"
                    )
            groups[name] = list(claimed.values())
        return cls(world, list(by_node.values()), groups)

    @classmethod
    def from_leaders(cls, node_ids: Sequence[str | int], names: Sequence[str], leaders: Sequence[Sequence[int]],
                     digests: Sequence[int]) -> Topology:
        """:meth:`from_reports` for the smallest reports: ``leaders[r][i]`` labels rank ``r``'s
        group ``names[i]`` (its lowest member), ``digests[r]`` is :func:`groups_digest` of the
        :func:`group_key` of each of rank ``r``'s groups, in ``names`` order.

        Called on every rank after the first collective of a save or load
        (through :func:`from_label_arrays`). The ranks are grouped by label; a
        rank whose digest differs from that of the groups so formed passed
        other members than its peers, and :class:`TopologyMismatchError` names
        those ranks (the caller may then fetch the member lists to say more).
        Linear in the world size.
        """
        world = len(node_ids)
        node_keys = {n: i for i, n in enumerate(dict.fromkeys(node_ids))}
        return cls.from_label_arrays(
            np.fromiter((node_keys[n] for n in node_ids), dtype=np.int64, count=world), names,
            np.array(leaders, dtype=np.int64).reshape(world, len(names)),
            np.array([d & _MASK64 for d in digests], dtype=np.uint64))

    @classmethod
    def from_label_arrays(cls, nodes: np.ndarray, names: Sequence[str], labels: np.ndarray,
                          digests: np.ndarray) -> Topology:
        """:meth:`from_leaders` on arrays: ``nodes[r]`` any integer naming rank ``r``'s node,
        ``labels[r, i]`` its group ``names[i]``'s label, ``digests[r]`` (uint64) its groups digest.

        Pure, vectorised (no Python work per rank beyond one digest). The
        partitions it builds are partitions by construction, so the
        constructor's checks are skipped.
        """
        world = len(nodes)
        node_sets, node_of, _ = _label_groups(nodes)
        groups: dict[str, Partition] = {}
        keys = np.zeros((world, len(names)), dtype=np.uint64)
        for i, name in enumerate(names):
            check_name(name, field_name="process group name")
            groups[name], member_of, group_keys = _label_groups(labels[:, i], keyed=True)
            keys[:, i] = group_keys[member_of]
        row = 8 * len(names)
        packed = keys.astype("<u8").tobytes()
        rows = (map(packed.__getitem__, map(slice, range(0, world * row, row), range(row, world * row + row, row)))
                if row else repeat(b"", world))  # one C call per rank, no Python frame
        recomputed = np.fromiter(map(xxhash.xxh3_64_intdigest, rows), dtype=np.uint64, count=world)
        odd = np.flatnonzero(recomputed != digests.astype(np.uint64)).tolist()
        if odd:
            raise TopologyMismatchError(
                f"process groups: ranks {odd[:20]}{' ...' if len(odd) > 20 else ''} passed other members "
                "than their peers (every member must pass the same members, itself included)")
        topology = object.__new__(cls)
        object.__setattr__(topology, "world_size", world)
        object.__setattr__(topology, "nodes", node_sets)
        object.__setattr__(topology, "groups", MappingProxyType(dict(sorted(groups.items()))))
        object.__setattr__(topology, "_node_of", tuple(node_of.tolist()))
        return topology

    def node_of(self, rank: int) -> int:
        """Index of the node that holds ``rank`` (``KeyError`` outside the world)."""
        if not 0 <= rank < self.world_size:
            raise KeyError(rank)
        return self._node_of[rank]

    node_index = node_of  # the name used before the topology was public

    def local_rank(self, rank: int) -> int:
        """Position of ``rank`` among the ranks of its node, counted from 0 by rank."""
        return self.nodes[self.node_of(rank)].index(rank)

    def group(self, name: str) -> Partition:
        """The partition named ``name``; :class:`TopologyMismatchError` listing the known
        names when the trainer did not pass such a group."""
        if name not in self.groups:
            known = ", ".join(sorted(self.groups)) or "none"
            raise TopologyMismatchError(
                f"process group {name!r} is not among the groups passed to the coordinator "
                f"(known: {known}); pass it in process_groups"
            )
        return self.groups[name]

    def __repr__(self) -> str:
        groups = {name: [list(s) for s in part] for name, part in self.groups.items()}
        return f"Topology(nodes={[list(s) for s in self.nodes]}, groups={groups})"

    def to_dict(self) -> dict[str, object]:
        """JSON form used in the manifest."""
        return {
            "nodes": list(map(list, self.nodes)),
            "groups": {name: list(map(list, part)) for name, part in self.groups.items()},
        }


def rank_text(ranks: Iterable[int]) -> str:
    """Compact rank list for messages: ``0-3``, ``0,4``, ``0-2,5`` (runs of three or more as ranges).

    Pure. Called by the CLI's tables and legacy conversion's errors.
    """
    ordered = sorted(ranks)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(r) for r in ordered[i:j + 1])
        i = j + 1
    return ",".join(parts)
