"""Layout: which file each replica set is written to, and by whom.

Pure module. Given a topology and a pattern, :func:`plan_component` lists
one :class:`FilePlan` per replica set: its relative path inside the checkpoint
directory (the pattern's :meth:`~distckpt.patterns.Pattern.file_stem`), the
ranks it belongs to and its writer (always the lowest rank of the set). A *balanced* write (:func:`part_writers`) splits a large replica set's
state into parts written by several of its members, node by node. Loading never parses these names; it finds a rank's file through the
manifest. :func:`check_relpath` is the one place that says whether a relative
path may be joined to a checkpoint directory.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import add, attrgetter, itemgetter, not_
from typing import Any

from .patterns import Pattern, SharingPattern, resolve_pattern
from .topology import Topology

__all__ = [
    "FILE_SUFFIX",
    "ComponentPlan",
    "FilePlan",
    "check_relpath",
    "part_writers",
    "plan_component",
    "split_plan",
]

FILE_SUFFIX = ".safetensors"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SEGMENTS = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,254}\n)*")  # segments, each ended by a newline
#: ``<segment>/<segment>``; a segment starts with a letter or digit, so "." and ".." never match.
_RELPATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}/[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True, slots=True)
class FilePlan:
    """One file of a component: where it goes, whose state it holds, who writes it,
    and which part of the set's state it is (``part`` of ``parts``; 0 of 1 when whole)."""

    path: str
    ranks: tuple[int, ...]
    writer: int
    part: int = 0
    parts: int = 1

    @classmethod
    def _wholes(cls, paths: Sequence[str], partition: Sequence[tuple[int, ...]]) -> tuple[FilePlan, ...]:
        """The plans of whole files, each written by its set's lowest rank, without the dataclass
        ``__init__`` nor a Python frame per file: C code (``map``) makes the objects and fills
        each slot a column at a time (for the 65,536 files of PER_RANK at 65,536 ranks)."""
        n = len(paths)
        if len(partition) != n:
            raise ValueError(f"FilePlan._wholes: {n} paths for {len(partition)} sets")
        plans = tuple(map(object.__new__, repeat(cls, n)))
        columns = (paths, partition, map(itemgetter(0), partition), repeat(0, n), repeat(1, n))
        for fill, column in zip(_FILL, columns, strict=True):
            deque(map(fill, plans, column), maxlen=0)
        return plans


_FILL = tuple(getattr(FilePlan, name).__set__ for name in ("path", "ranks", "writer", "part", "parts"))


@dataclass(frozen=True)
class ComponentPlan:
    """Every file of one component, ordered by replica set."""

    key: str
    pattern: Pattern
    files: tuple[FilePlan, ...]

    @property
    def writers(self) -> tuple[int, ...]:
        return tuple(sorted(set(map(attrgetter("writer"), self.files))))

    @property
    def replica_sets(self) -> tuple[tuple[int, ...], ...]:
        """The ranks of each set, from its part 0 (C-level: ``compress`` keeps the files whose part is 0)."""
        return tuple(compress(map(attrgetter("ranks"), self.files), map(not_, map(attrgetter("part"), self.files))))


def plan_component(
    topology: Topology, key: str, pattern: Pattern | SharingPattern | str, group_name: str | None = None,
    sizes: Mapping[int, int] | None = None, min_part_bytes: int | None = None,
) -> ComponentPlan:
    """Plan the files of one component. Pure; called on every rank by the save and load phases.

    ``pattern`` is a :class:`~distckpt.patterns.Pattern` (or a built-in alias with
    ``group_name``). Its replica sets are checked to partition the world
    (:class:`TopologyMismatchError` naming the pattern and the ranks otherwise) and
    its file stems to be safe and distinct (``ValueError``). With
    ``min_part_bytes``, a set of a pattern with identical replicas whose state
    (``sizes[lowest rank]``, in bytes) is large enough is split by :func:`part_writers`.
    """
    resolved = pattern if isinstance(pattern, Pattern) else resolve_pattern(pattern, group_name)
    partition = resolved.partition(topology)
    names = list(map(add, resolved._file_stems(partition), repeat(FILE_SUFFIX)))
    _check_names(resolved, partition, names)
    paths = list(map((key + "/").__add__, names))  # one file per set, written by its lowest rank (sets are sorted)
    whole = ComponentPlan(key=key, pattern=resolved, files=FilePlan._wholes(paths, partition))
    if not (min_part_bytes and resolved.identical_replicas):
        return whole
    return split_plan(topology, whole, sizes or {}, min_part_bytes)


def split_plan(topology: Topology, whole: ComponentPlan, sizes: Mapping[int, int],
               min_part_bytes: int) -> ComponentPlan:
    """``whole`` (one file per set, :func:`plan_component` without sizes) with each set whose
    state is large enough split into parts by :func:`part_writers`. Pure and deterministic.

    ``sizes[lowest rank of a set]`` is that set's state in bytes (a set absent from it counts
    as small). Called by :func:`plan_component`, and by the save's plan phase once the sets'
    lowest ranks, and only they, have sized their state (:mod:`distckpt.saving`).
    """
    if not whole.pattern.identical_replicas:
        return whole
    files: list[FilePlan] = []
    for f in whole.files:
        writers = part_writers(topology, f.ranks, sizes.get(f.ranks[0], 0), min_part_bytes)
        if len(writers) == 1:
            files.append(f)
            continue
        base = f.path.removesuffix(FILE_SUFFIX)
        files += [FilePlan(path=f"{base}.part-{p:03d}-of-{len(writers):03d}{FILE_SUFFIX}", ranks=f.ranks,
                           writer=w, part=p, parts=len(writers)) for p, w in enumerate(writers)]
    return ComponentPlan(key=whole.key, pattern=whole.pattern, files=tuple(files))


def _check_names(pattern: Pattern, partition: Sequence[tuple[int, ...]], names: Sequence[Any]) -> None:
    """Every file name is a safe segment, distinct from the others ignoring case; else ``ValueError``
    naming the first that is not. All names are checked at once; the loop only finds the culprit."""
    if set(map(type, names)) <= {str}:
        joined = "\n".join(names) + "\n"
        if (joined.count("\n") == len(names) and _SEGMENTS.fullmatch(joined) is not None
                and len(set(joined.casefold().split("\n"))) == len(names) + 1):
            return
    stems: set[str] = set()
    for i, (name, members) in enumerate(zip(names, partition, strict=True)):
        if not isinstance(name, str) or _SEGMENT.fullmatch(name) is None or name.casefold() in stems:
            raise ValueError(f"pattern {pattern.describe()}: file_stem({i}, {list(members)}) gave "
                             f"{name!r}, which is not a safe file name distinct from the other sets'")
        stems.add(name.casefold())


def part_writers(topology: Topology, members: tuple[int, ...], size_bytes: int,
                 min_part_bytes: int) -> tuple[int, ...]:
    """Writers of a balanced write of one replica set, part 0 first. Pure and deterministic.

    ``min(members, size_bytes // min_part_bytes)`` parts, at least one, so no
    part is smaller than ``min_part_bytes``. Writers are taken round-robin
    over the set's nodes: the lowest rank of every node first (parallel file
    systems reward clients on different nodes), then the second lowest of
    every node, and so on (several writers per node still help where one
    writer is bound by copying into the page cache). Part 0 is always
    written by the set's lowest rank.
    """
    if min_part_bytes < 1:
        raise ValueError(f"min_part_bytes: expected a positive int, got {min_part_bytes}")
    by_node: dict[int, list[int]] = {}
    for rank in sorted(members):
        by_node.setdefault(topology.node_of(rank), []).append(rank)
    columns = sorted(by_node.values())
    order = [col[k] for k in range(max(len(c) for c in columns)) for col in columns if k < len(col)]
    count = max(1, min(len(order), size_bytes // min_part_bytes))
    return tuple(order[:count])


def check_relpath(relpath: str) -> str:
    """Return ``relpath`` if it is ``<name>/<name>`` with safe names; else ``ValueError``.

    Used on every path read from a manifest before it is joined to a directory,
    so that no manifest can point outside its checkpoint.
    """
    if not isinstance(relpath, str) or _RELPATH.fullmatch(relpath) is None:
        raise ValueError(f"unsafe file path {relpath!r} in manifest; expected '<key>/<file>'")
    return relpath
