"""The oracle: which files a checkpoint must hold, from a world's plain data alone.

The one statement of the rules that the harness and the property suite test
against. Its functions take plain data: a :class:`World` (the world size, the
nodes as rank lists, and named group partitions), a pattern kind and its
params. ``harness`` builds the world from a scenario's topology
(:func:`scenario_world`); ``tests/property`` from a drawn topology.

For the five built-in patterns this is an independent, hand-written reading of
the design of record (``DESIGN.md`` sections 1 and 3) that imports none of
distckpt's partition code (``patterns``, ``topology``, ``layout``):

- ranks are numbered node by node in a scenario: node ``n`` holds the
  ``procs_per_node[n]`` ranks after those of the nodes before it (with equal
  sizes, rank ``r`` lives on node ``r // procs_per_node``); nodes are ordered
  by their lowest rank;
- a mesh is row-major: the last dimension varies fastest over consecutive ranks,
  and the group of dimension ``d`` holding rank ``r`` is every rank whose
  coordinates equal ``r``'s except along ``d``;
- replica sets: one set of all ranks (``global``, ``replicated``), one per rank
  (``per_rank``), one per node (``per_node``), one per group of the named
  partition (``per_group``); with several names, the join of those partitions:
  ranks that share a group in any of them share a set;
- sets are ordered by their lowest rank and written by it; file names are
  ``global``, ``replicated``, ``rank-NNNNN`` (the rank), ``node-NNN`` and
  ``<g1>_<g2>-NNN`` (the set's index), each ``.safetensors`` under a directory
  named after the component; a balanced write of ``n`` parts names its files
  ``<stem>.part-III-of-NNN.safetensors``;
- the manifest records ``sharing_pattern`` (the kind), ``group_name`` (the group
  of a one-group ``per_group``, else null) and ``pattern = {kind, params}``.

For any other registered kind the expected sets and file names are derived
from the pattern object itself: ``pattern_from_record(kind, params)``, its
``replica_sets`` over a ``distckpt.Topology`` built from the same plain data
(checked here to partition the world and sorted here), and its ``file_stem``.
Only the file layout around them (writers, parts, manifest) is the oracle's own.

:func:`check_checkpoint` compares a committed checkpoint on disk (its files and
its manifest, read as plain JSON) with that derivation.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.scenario import ComponentSpec, Scenario, Topology

__all__ = [
    "BUILTIN_KINDS",
    "ExpectedComponent",
    "ExpectedFile",
    "World",
    "check_checkpoint",
    "checkpoint_files",
    "expected_component",
    "expected_components",
    "file_stem",
    "join",
    "mesh_partition",
    "node_blocks",
    "replica_sets",
    "scenario_world",
    "set_index_of",
]

MANIFEST = "manifest.json"
SUFFIX = ".safetensors"
#: The five built-in kinds the oracle knows by heart.
BUILTIN_KINDS: tuple[str, ...] = ("global", "replicated", "per_rank", "per_node", "per_group")

Partition = tuple[tuple[int, ...], ...]


def _sorted_sets(sets: Iterable[Iterable[int]]) -> Partition:
    return tuple(sorted((tuple(sorted(s)) for s in sets), key=lambda s: (s[0] if s else -1, s)))


@dataclass(frozen=True)
class World:
    """Plain data of a world: its nodes and named group partitions (rank lists).

    Build it with :meth:`of`, which sorts every set and every partition by
    lowest rank. ``world_size`` is the number of ranks on the nodes.
    """

    nodes: Partition
    groups: tuple[tuple[str, Partition], ...] = ()

    @classmethod
    def of(cls, nodes: Iterable[Iterable[int]],
           groups: Mapping[str, Iterable[Iterable[int]]] | None = None) -> World:
        """A world from rank lists: ``World.of([[0, 1], [2]], {"dp": [[0, 2], [1]]})``."""
        named = groups or {}
        return cls(_sorted_sets(nodes), tuple((n, _sorted_sets(named[n])) for n in sorted(named)))

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return sum(len(n) for n in self.nodes)

    def group(self, name: str) -> Partition:
        """The partition named ``name``; ``KeyError`` naming the known ones."""
        for known, part in self.groups:
            if known == name:
                return part
        raise KeyError(f"no group {name!r} in this world (groups: {[n for n, _ in self.groups]})")

    def group_dict(self) -> dict[str, list[list[int]]]:
        """The groups as JSON-ready lists."""
        return {name: [list(s) for s in part] for name, part in self.groups}


def node_blocks(nodes: int, procs_per_node: int | Sequence[int]) -> Partition:
    """The ranks of each node when ranks are numbered node by node.

    ``procs_per_node`` is every node's size, or a sequence with each node's size
    (nodes of different sizes, as torchrun numbers the workers of uneven agents).
    """
    sizes = [procs_per_node] * nodes if isinstance(procs_per_node, int) else list(procs_per_node)
    if len(sizes) != nodes:
        raise ValueError(f"{nodes} nodes but {len(sizes)} node sizes {sizes}")
    blocks, first = [], 0
    for size in sizes:
        blocks.append(tuple(range(first, first + size)))
        first += size
    return tuple(blocks)


def mesh_partition(mesh: Sequence[tuple[str, int]], dim: str) -> Partition:
    """The groups of mesh dimension ``dim`` of a row-major mesh, ordered by lowest rank."""
    names = [n for n, _ in mesh]
    sizes = [s for _, s in mesh]
    if dim not in names:
        raise KeyError(f"{dim!r} is not a mesh dimension (dimensions: {names})")
    axis = names.index(dim)
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    groups = []
    others = [range(s) if i != axis else range(1) for i, s in enumerate(sizes)]
    for coords in itertools.product(*others):
        base = sum(c * st for c, st in zip(coords, strides, strict=True))
        groups.append(tuple(base + k * strides[axis] for k in range(sizes[axis])))
    return _sorted_sets(groups)


def scenario_world(topology: Topology) -> World:
    """A scenario topology's world: contiguous nodes, one group partition per mesh dimension."""
    return World.of(node_blocks(topology.nodes, topology.procs_per_node),
                    {name: mesh_partition(topology.mesh, name) for name, _ in topology.mesh})


def join(world_size: int, partitions: Sequence[Partition]) -> Partition:
    """The join of partitions: merge every block that shares a rank with a group of any of
    them until nothing changes (deliberately not distckpt's union-find)."""
    blocks: list[set[int]] = [{r} for r in range(world_size)]
    for part in partitions:
        for group in part:
            touching = [b for b in blocks if b & set(group)]
            merged = set().union(*touching) | set(group)
            blocks = [b for b in blocks if not b & set(group)] + [merged]
    return _sorted_sets(blocks)


def _groups_param(params: Mapping[str, Any]) -> list[str]:
    groups = params.get("groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(g, str) for g in groups):
        raise ValueError(f"per_group needs params {{'groups': [names...]}}, got {dict(params)!r}")
    return groups


def _builtin_sets(world: World, kind: str, params: Mapping[str, Any]) -> Partition:
    everyone = tuple(range(world.world_size))
    if kind in ("global", "replicated"):
        return (everyone,)
    if kind == "per_rank":
        return tuple((r,) for r in everyone)
    if kind == "per_node":
        return world.nodes
    names = _groups_param(params)
    if len(names) == 1:
        return world.group(names[0])
    return join(world.world_size, [world.group(n) for n in names])


def _pattern(kind: str, params: Mapping[str, Any]) -> Any:
    """The registered pattern object (only for kinds that are not built-in)."""
    from distckpt.patterns import pattern_from_record

    return pattern_from_record(kind, params)


def _derived_sets(world: World, kind: str, params: Mapping[str, Any]) -> Partition:
    from distckpt import Topology as LibTopology

    topo = LibTopology(nodes=[list(n) for n in world.nodes], groups=world.group_dict())
    sets = _sorted_sets(_pattern(kind, params).replica_sets(topo))
    flat = [r for s in sets for r in s]
    if not all(sets) or sorted(flat) != list(range(world.world_size)):
        raise ValueError(f"pattern {kind} {dict(params)}: sets {[list(s) for s in sets]} do not "
                         f"partition a world of {world.world_size} ranks")
    return sets


def replica_sets(world: World, kind: str, params: Mapping[str, Any] | None = None) -> Partition:
    """A pattern's replica sets in ``world``, ordered by lowest rank (see the module doc)."""
    params = params or {}
    if kind in BUILTIN_KINDS:
        return _builtin_sets(world, kind, params)
    return _derived_sets(world, kind, params)


def set_index_of(sets: Partition, rank: int) -> int:
    """Index of the set holding ``rank``."""
    return next(i for i, s in enumerate(sets) if rank in s)


def file_stem(kind: str, params: Mapping[str, Any] | None, index: int, members: Sequence[int]) -> str:
    """File name, without directory and suffix, of replica set ``index`` with ``members``."""
    params = params or {}
    if kind in ("global", "replicated"):
        return kind
    if kind == "per_rank":
        return f"rank-{members[0]:05d}"
    if kind == "per_node":
        return f"node-{index:03d}"
    if kind == "per_group":
        return f"{'_'.join(_groups_param(params))}-{index:03d}"
    return str(_pattern(kind, params).file_stem(index, tuple(members)))


def group_name(kind: str, params: Mapping[str, Any] | None) -> str | None:
    """The manifest's ``group_name``: the group of a one-group ``per_group``, else ``None``."""
    groups = (params or {}).get("groups")
    if kind == "per_group" and isinstance(groups, list) and len(groups) == 1:
        return str(groups[0])
    return None


@dataclass(frozen=True)
class ExpectedFile:
    """One file the checkpoint must hold: its path, the ranks it serves, its writer."""

    path: str
    ranks: tuple[int, ...]
    writer: int


@dataclass(frozen=True)
class ExpectedComponent:
    """A component's expected pattern record, replica sets and files."""

    key: str
    pattern: str
    replica_sets: Partition
    files: tuple[ExpectedFile, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str | None:
        """The manifest's ``group_name``."""
        return group_name(self.pattern, self.params)

    @property
    def record(self) -> dict[str, Any]:
        """The manifest's ``pattern`` object."""
        return {"kind": self.pattern, "params": dict(self.params)}

    @property
    def writers(self) -> tuple[int, ...]:
        """Writer ranks, ascending (each once: a balanced write's part writers included)."""
        return tuple(sorted({f.writer for f in self.files}))


def expected_component(world: World, key: str, kind: str, params: Mapping[str, Any] | None = None,
                       parts: int = 1) -> ExpectedComponent:
    """What one component of pattern ``kind`` (with ``params``) must look like on disk.

    ``parts`` > 1 (a scenario's ``expect.parts``): every replica set is a
    balanced write of ``min(parts, members)`` part files (one file when that
    is 1), written by the set's members taken node by node: the lowest rank
    of each node (nodes in rank order), then the second lowest of each, ...
    """
    params = dict(params or {})
    sets = replica_sets(world, kind, params)
    # The manifest records what the pattern object says its params are (defaults filled in).
    recorded = params if kind in BUILTIN_KINDS else dict(_pattern(kind, params).params())
    files: list[ExpectedFile] = []
    for i, members in enumerate(sets):
        stem = file_stem(kind, params, i, members)
        columns = [[r for r in node if r in members] for node in world.nodes]
        columns = [c for c in columns if c]
        order = [c[k] for k in range(max(len(c) for c in columns)) for c in columns if k < len(c)]
        count = min(parts, len(order))
        if count == 1:
            files.append(ExpectedFile(f"{key}/{stem}{SUFFIX}", members, min(members)))
            continue
        files += [ExpectedFile(f"{key}/{stem}.part-{p:03d}-of-{count:03d}{SUFFIX}", members, w)
                  for p, w in enumerate(order[:count])]
    return ExpectedComponent(key, kind, sets, tuple(files), recorded)


def expected_of_spec(world: World, spec: ComponentSpec, parts: int = 1) -> ExpectedComponent:
    """:func:`expected_component` of a scenario's declared component."""
    return expected_component(world, spec.key, spec.pattern, spec.params, parts)


def expected_components(scenario: Scenario, topology: Topology | None = None) -> dict[str, ExpectedComponent]:
    """Every declared component of ``scenario`` in its saving topology (or ``topology``)."""
    world = scenario_world(topology or scenario.topology)
    return {c.key: expected_of_spec(world, c, scenario.expect.parts.get(c.key, 1))
            for c in scenario.components}


def check_checkpoint(path: str, scenario: Scenario, topology: Topology | None = None) -> list[str]:
    """Differences between the checkpoint at ``path`` and the oracle; empty when they agree.

    Called by the runner on the parent after a save. Checks the files on disk
    (exactly the expected ones, plus the manifest), the manifest's world size,
    and for every component its kind, group, pattern record, writers, replica
    sets, and every file's ranks, writer and size; and that the scenario's own
    ``expect.writers`` agree with the oracle. Never raises for a bad checkpoint.
    """
    topo = topology or scenario.topology
    try:
        expected = expected_components(scenario, topo)
    except (KeyError, LookupError, ValueError) as exc:
        return [f"cannot derive the expected layout: {exc}"]
    problems: list[str] = []
    for key, writers in scenario.expect.writers.items():
        if tuple(writers) != expected[key].writers:
            problems.append(
                f"scenario says {key} writers {list(writers)}, oracle derives "
                f"{list(expected[key].writers)}"
            )
    on_disk = checkpoint_files(path)
    want_files = {f.path for comp in expected.values() for f in comp.files} | {MANIFEST}
    if on_disk != want_files:
        extra = sorted(on_disk - want_files)
        missing = sorted(want_files - on_disk)
        if extra:
            problems.append(f"unexpected files: {extra}")
        if missing:
            problems.append(f"missing files: {missing}")
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return [*problems, f"cannot read manifest: {exc}"]
    if manifest.get("world_size") != topo.world_size:
        problems.append(f"manifest world_size {manifest.get('world_size')} != {topo.world_size}")
    components = manifest.get("components", {})
    if set(components) != set(expected):
        problems.append(f"manifest components {sorted(components)} != declared {sorted(expected)}")
    for key, want in expected.items():
        if key in components:
            problems.extend(_check_component(path, key, components[key], want))
    return problems


def _check_component(
    root: str, key: str, got: dict[str, object], want: ExpectedComponent
) -> list[str]:
    problems: list[str] = []

    def differ(what: str, have: object, expect: object) -> None:
        problems.append(f"{key}: {what} is {have!r}, oracle says {expect!r}")

    if got.get("sharing_pattern") != want.pattern:
        differ("sharing_pattern", got.get("sharing_pattern"), want.pattern)
    if got.get("group_name") != want.group:
        differ("group_name", got.get("group_name"), want.group)
    if got.get("pattern") != want.record:
        differ("pattern", got.get("pattern"), want.record)
    writers = tuple(sorted(_ints(got.get("ranks"))))
    if writers != want.writers:
        differ("writers (ranks)", list(writers), list(want.writers))
    sets = tuple(tuple(_ints(s)) for s in _list(got.get("replicated_across")))
    if sets != want.replica_sets:
        differ("replicated_across", [list(s) for s in sets], [list(s) for s in want.replica_sets])
    files = {str(f.get("path")): f for f in _file_rows(got) if isinstance(f, dict)}
    for wf in want.files:
        entry = files.get(wf.path)
        if entry is None:
            problems.append(f"{key}: manifest lists no file {wf.path}")
            continue
        if tuple(_ints(entry.get("ranks"))) != wf.ranks:
            differ(f"{wf.path} ranks", _ints(entry.get("ranks")), list(wf.ranks))
        if entry.get("writer") != wf.writer:
            differ(f"{wf.path} writer", entry.get("writer"), wf.writer)
        full = os.path.join(root, wf.path)
        if os.path.isfile(full) and entry.get("size_bytes") != os.path.getsize(full):
            differ(f"{wf.path} size_bytes", entry.get("size_bytes"), os.path.getsize(full))
    extra = sorted(set(files) - {f.path for f in want.files})
    if extra:
        problems.append(f"{key}: manifest lists unexpected files {extra}")
    return problems


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _ints(value: object) -> list[int]:
    return [v for v in _list(value) if isinstance(v, int)]


def _file_rows(got: dict[str, object]) -> list[object]:
    """A component's file objects; a format 1.4 ``file_table`` (columns; no ``ranks`` column when
    file i is replica set i) is turned back into one object per file."""
    table = got.get("file_table")
    if not isinstance(table, dict):
        return _list(got.get("files"))
    ranks = table["ranks"] if "ranks" in table else got.get("replicated_across")
    columns = [_list(table.get("path")), _list(ranks), _list(table.get("writer")), _list(table.get("size_bytes"))]
    return [{"path": p, "ranks": r, "writer": w, "size_bytes": n} for p, r, w, n in zip(*columns, strict=False)]


def checkpoint_files(path: str) -> set[str]:
    """Every regular file under ``path``, relative, with '/' separators."""
    out: set[str] = set()
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            out.add(os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/"))
    return out
