"""The oracle: which files a checkpoint must hold, derived from a scenario's topology alone.

This is an independent reading of the design of record (``DESIGN.md`` sections
1 and 3), deliberately sharing no code with distckpt's rank selection:

- ranks are numbered node by node: rank ``r`` lives on node ``r // procs_per_node``;
- a mesh is row-major: the last dimension varies fastest over consecutive ranks,
  and the group of dimension ``d`` holding rank ``r`` is every rank whose
  coordinates equal ``r``'s except along ``d``;
- a pattern's replica sets: one set of all ranks (GLOBAL, REPLICATED), one set per
  rank (PER_RANK), one per node (PER_NODE), one per group of the named dimension
  (PER_GROUP); sets are ordered by their lowest rank and written by it;
- file names: ``global``, ``replicated``, ``rank-NNNNN`` (the rank),
  ``node-NNN`` and ``<group>-NNN`` (the set's index), each ``.safetensors`` under
  a directory named after the component.

:func:`check_checkpoint` compares a committed checkpoint on disk (its files and
its manifest, read as plain JSON) with that derivation.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from harness.scenario import ComponentSpec, Scenario, Topology

__all__ = [
    "ExpectedComponent",
    "ExpectedFile",
    "check_checkpoint",
    "expected_components",
    "mesh_groups",
    "node_groups",
    "replica_sets",
]

MANIFEST = "manifest.json"
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ExpectedFile:
    """One file the checkpoint must hold: its path, the ranks it serves, its writer."""

    path: str
    ranks: tuple[int, ...]
    writer: int


@dataclass(frozen=True)
class ExpectedComponent:
    """A component's expected pattern, group, replica sets and files."""

    key: str
    pattern: str
    group: str | None
    replica_sets: tuple[tuple[int, ...], ...]
    files: tuple[ExpectedFile, ...]

    @property
    def writers(self) -> tuple[int, ...]:
        """Writer ranks, ascending (each once: a balanced write's part writers included)."""
        return tuple(sorted({f.writer for f in self.files}))


def node_groups(topology: Topology) -> tuple[tuple[int, ...], ...]:
    """The ranks of each node, in node order."""
    ppn = topology.procs_per_node
    return tuple(tuple(range(n * ppn, (n + 1) * ppn)) for n in range(topology.nodes))


def mesh_groups(topology: Topology, dim: str) -> tuple[tuple[int, ...], ...]:
    """The groups of mesh dimension ``dim``, ordered by lowest rank."""
    names = [n for n, _ in topology.mesh]
    sizes = [s for _, s in topology.mesh]
    if dim not in names:
        raise KeyError(f"{dim!r} is not a mesh dimension of {topology.describe()}")
    axis = names.index(dim)
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    groups = []
    others = [range(s) if i != axis else range(1) for i, s in enumerate(sizes)]
    for coords in itertools.product(*others):
        base = sum(c * st for c, st in zip(coords, strides, strict=True))
        groups.append(tuple(base + k * strides[axis] for k in range(sizes[axis])))
    return tuple(sorted(groups))


def replica_sets(
    topology: Topology, pattern: str, group: str | None
) -> tuple[tuple[int, ...], ...]:
    """A pattern's replica sets in a topology, ordered by lowest rank."""
    world = topology.world_size
    if pattern in ("global", "replicated"):
        return (tuple(range(world)),)
    if pattern == "per_rank":
        return tuple((r,) for r in range(world))
    if pattern == "per_node":
        return node_groups(topology)
    if pattern == "per_group":
        if group is None:
            raise ValueError("per_group needs a group name")
        return mesh_groups(topology, group)
    raise ValueError(f"unknown pattern {pattern!r}")


def _file_name(pattern: str, index: int, members: Sequence[int], group: str | None) -> str:
    stems = {"global": "global", "replicated": "replicated"}
    if pattern in stems:
        return stems[pattern] + SUFFIX
    if pattern == "per_rank":
        return f"rank-{members[0]:05d}{SUFFIX}"
    if pattern == "per_node":
        return f"node-{index:03d}{SUFFIX}"
    return f"{group}-{index:03d}{SUFFIX}"


def expected_component(topology: Topology, spec: ComponentSpec, parts: int = 1) -> ExpectedComponent:
    """What one declared component must look like on disk.

    ``parts`` > 1 (a scenario's ``expect.parts``): every replica set is a
    balanced write of ``min(parts, members)`` part files (one file when that
    is 1), written by the set's members taken node by node: the lowest rank
    of each node (nodes in rank order), then the second lowest of each, ...
    """
    sets = replica_sets(topology, spec.pattern, spec.group)
    files: list[ExpectedFile] = []
    for i, members in enumerate(sets):
        name = _file_name(spec.pattern, i, members, spec.group)
        columns = [[r for r in node if r in members] for node in node_groups(topology)]
        columns = [c for c in columns if c]
        order = [c[k] for k in range(max(len(c) for c in columns)) for c in columns if k < len(c)]
        count = min(parts, len(order))
        if count == 1:
            files.append(ExpectedFile(f"{spec.key}/{name}", tuple(members), min(members)))
            continue
        stem = name.removesuffix(SUFFIX)
        files += [ExpectedFile(f"{spec.key}/{stem}.part-{p:03d}-of-{count:03d}{SUFFIX}", tuple(members), w)
                  for p, w in enumerate(order[:count])]
    return ExpectedComponent(spec.key, spec.pattern, spec.group, sets, tuple(files))


def expected_components(
    scenario: Scenario, topology: Topology | None = None
) -> dict[str, ExpectedComponent]:
    """Every declared component of ``scenario`` in its saving topology (or ``topology``)."""
    topo = topology or scenario.topology
    return {c.key: expected_component(topo, c, scenario.expect.parts.get(c.key, 1))
            for c in scenario.components}


def check_checkpoint(path: str, scenario: Scenario, topology: Topology | None = None) -> list[str]:
    """Differences between the checkpoint at ``path`` and the oracle; empty when they agree.

    Checks the files on disk (exactly the expected ones, plus the manifest), the
    manifest's world size, and for every component its pattern, group, writers,
    replica sets, and every file's ranks, writer and size; and that the
    scenario's own ``expect.writers`` agree with the oracle.
    """
    topo = topology or scenario.topology
    expected = expected_components(scenario, topo)
    problems: list[str] = []
    for key, writers in scenario.expect.writers.items():
        if tuple(writers) != expected[key].writers:
            problems.append(
                f"scenario says {key} writers {list(writers)}, oracle derives "
                f"{list(expected[key].writers)}"
            )
    on_disk = _files_under(path)
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
    writers = tuple(sorted(_ints(got.get("ranks"))))
    if writers != want.writers:
        differ("writers (ranks)", list(writers), list(want.writers))
    sets = tuple(tuple(_ints(s)) for s in _list(got.get("replicated_across")))
    if sets != want.replica_sets:
        differ("replicated_across", [list(s) for s in sets], [list(s) for s in want.replica_sets])
    files = {str(f.get("path")): f for f in _list(got.get("files")) if isinstance(f, dict)}
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


def _files_under(path: str) -> set[str]:
    out: set[str] = set()
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            out.add(os.path.relpath(os.path.join(dirpath, name), path).replace(os.sep, "/"))
    return out
