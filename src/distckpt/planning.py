"""Planning a save: pure functions of the declarations, the ranks' reports and the write records.

Called by the save and load phases (:mod:`distckpt.saving`,
:mod:`distckpt.loading`) on every rank, always with the same inputs on every
rank, so every rank reaches the same answer without talking to the others.
Nothing here does I/O or a collective; a disagreement raises a
:class:`~distckpt.errors.CheckpointError` subclass that the calling phase
turns into the same error on every rank.

- :func:`local_report`, :func:`agree`: what each rank reports in the first
  collective, and the topology every rank derives after checking that the
  declarations agree.
- :func:`plan_components`, :func:`plan_digest`, :func:`check_same_plan`: the
  files of every component (from its pattern), and the check that the
  patterns answered alike on every rank.
- :func:`check_parts_agree`: the parts of a balanced write fit together.
- :func:`build_manifest`: the manifest of a save from its plan and the
  write records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .codec import EncodedState
from .components import StateComponent, ValidationLevel
from .errors import (
    CheckpointError,
    ComponentMismatchError,
    ReplicationMismatchError,
    TopologyMismatchError,
    on_every_rank,
)
from .hashing import checksum_of
from .layout import ComponentPlan, plan_component
from .manifest import CheckpointManifest, ComponentManifest, FileEntry
from .topology import Topology, group_key
from .version import __version__

__all__ = [
    "Job",
    "Produce",
    "Record",
    "SavePlan",
    "agree",
    "build_manifest",
    "check_parts_agree",
    "check_same_plan",
    "declaration",
    "local_report",
    "plan_components",
    "plan_digest",
    "validated_components",
]

#: key, relative path, encoded file, structure digest (parts only), and for the writer of a
#: balanced write's part 0 the other parts of its own replica (paths and bytes), to predict their checksums
Job = tuple[str, str, EncodedState, str, tuple[tuple[str, EncodedState], ...]]
#: This rank's files to write, as a fresh iterator of jobs on every call.
Produce = Callable[[], Iterator[Job]]
Record = tuple[int, str, int, str]  # size, checksum, writer, structure digest


@dataclass(frozen=True)
class SavePlan:
    """One save as every rank knows it after the plan phase: where, which id and sequence, and
    every component's files. Built by :func:`distckpt.saving.plan`; read by the later phases."""

    path: str
    staging: str
    checkpoint_id: str
    sequence: int
    timestamp: str
    topology: Topology
    components: Mapping[str, ComponentPlan]


def declaration(c: StateComponent) -> tuple[Any, ...]:
    """What every rank must declare alike about a component (compared by :func:`agree`)."""
    return (c.key, c.pattern.describe(), c.required, c.validate_replication, c.validation_level.value)


def local_report(node: str, groups: Mapping[str, tuple[int, ...]],
                 components: Sequence[StateComponent], full: bool = False) -> dict[str, Any]:
    """This rank's part of the first collective of a save or load: node, groups, declarations.

    Compact (the default): each group as :func:`~distckpt.topology.group_key`
    and the declarations as one digest, a few bytes whatever the world and
    group sizes, so what every rank receives grows linearly with the world.
    ``full=True``: member lists and declarations themselves (the second round
    :func:`agree` asks for when declarations differ, to name the differences).
    """
    declared = [declaration(c) for c in components]
    if full:
        return {"node": node, "groups": dict(groups), "declarations": declared}
    digest = checksum_of(repr(declared).encode(), "xxh3-64").partition(":")[2]
    return {"node": node, "groups": {name: group_key(m) for name, m in groups.items()},
            "declarations": int(digest, 16)}


def agree(reports: Sequence[Mapping[str, Any]],
          full_reports: Callable[[], Sequence[Mapping[str, Any]]] | None = None, phase: str = "plan") -> Topology:
    """Every rank: check declarations agree, then build the topology. Deterministic.

    Raises :class:`ComponentMismatchError` naming the ranks that declared
    otherwise than rank 0, or :class:`TopologyMismatchError` (from
    :meth:`Topology.from_compact` or :meth:`Topology.from_reports`) for groups
    that are not partitions; either with ``phase`` set and ``failures`` naming
    every rank when none is singled out. With compact reports
    (:func:`local_report`) whose declaration digests differ, ``full_reports()``
    (a collective every rank calls, as every rank sees the same digests)
    fetches the full ones to name the differences.
    """
    try:
        return _agree(reports, full_reports)
    except CheckpointError as exc:
        raise on_every_rank(exc, phase, len(reports)) from None


def _agree(reports: Sequence[Mapping[str, Any]],
           full_reports: Callable[[], Sequence[Mapping[str, Any]]] | None) -> Topology:
    compact = bool(reports) and type(reports[0]["declarations"]) is int
    if compact and any(r["declarations"] != reports[0]["declarations"] for r in reports):
        if full_reports is None:
            raise ComponentMismatchError(
                "ranks declared different components; every rank must declare the same keys, "
                "patterns, groups and validation",
                failures={rank: "declares otherwise than rank 0" for rank, r in enumerate(reports)
                          if r["declarations"] != reports[0]["declarations"]})
        reports = full_reports()
        compact = False
    if compact:
        return Topology.from_compact([r["node"] for r in reports], [r["groups"] for r in reports])
    declared = [tuple(r["declarations"]) for r in reports]
    if any(d != declared[0] for d in declared):
        raise ComponentMismatchError(
            "ranks declared different components; every rank must declare the same keys, "
            "patterns, groups and validation",
            failures={rank: _diff_declarations(declared[0], d) for rank, d in enumerate(declared)
                      if d != declared[0]},
        )
    return Topology.from_reports([r["node"] for r in reports], [r["groups"] for r in reports])


def plan_components(topology: Topology, components: Sequence[StateComponent],
                    reports: Sequence[Mapping[str, Any]], min_part_bytes: int | None) -> dict[str, ComponentPlan]:
    """Each component's files from its pattern; the ``sizes`` of the reports decide balanced writes.

    Runs the patterns' own code, which may raise or answer differently on
    some rank: the save phase runs it inside a collective and compares
    :func:`plan_digest` across ranks.
    """
    plans: dict[str, ComponentPlan] = {}
    for index, c in enumerate(components):
        sizes = {r: _size(rep.get("sizes"), index, c.key) for r, rep in enumerate(reports)}
        plans[c.key] = plan_component(topology, c.key, c.pattern, sizes=sizes, min_part_bytes=min_part_bytes)
    return plans


def _size(sizes: Any, index: int, key: str) -> int:
    """A rank's reported bytes of a component: ``sizes`` by component position (compact) or key."""
    if isinstance(sizes, tuple):
        return int(sizes[index]) if index < len(sizes) else 0
    return int((sizes or {}).get(key, 0))


def plan_digest(plans: Mapping[str, ComponentPlan]) -> str:
    """A short digest of every component's files, compared across ranks by :func:`check_same_plan`."""
    text = repr(sorted((key, [(f.path, f.ranks, f.writer) for f in p.files]) for key, p in plans.items()))
    return checksum_of(text.encode(), "xxh3-64")


def check_same_plan(digests: Sequence[str], components: Sequence[StateComponent]) -> None:
    """Every rank: the patterns gave every rank the same files, or every rank raises."""
    differ = {rank: "planned different files than rank 0" for rank, d in enumerate(digests) if d != digests[0]}
    if differ:
        kinds = ", ".join(sorted({c.pattern.describe() for c in components}))
        raise TopologyMismatchError(
            f"sharing patterns gave different replica sets on different ranks (patterns: {kinds}); "
            "replica_sets(topology) must be deterministic", failures=differ, phase="plan")


def validated_components(components: Sequence[StateComponent], validate: bool) -> list[StateComponent]:
    """The components a save validates: those with replicas and a level, declared so or by ``validate``."""
    return [
        c for c in components
        if c.pattern.identical_replicas
        and c.validation_level is not ValidationLevel.NONE
        and (c.validate_replication or validate)
    ]


def check_parts_agree(plan: SavePlan, records: Mapping[str, Mapping[str, Record]],
                      predictions: Mapping[str, Mapping[str, str]]) -> None:
    """Every rank, after the write phase: the parts of each balanced write come from one state.

    A part must encode the same structure as part 0 of its set, and its
    checksum must equal the one part 0's writer predicted from its own
    replica (``predictions``: key -> part path -> checksum). Either failing
    raises the same :class:`ReplicationMismatchError` on every rank (phase
    "write"), naming the writers of the parts that disagree; nothing commits.
    """
    structure: dict[int, str] = {}
    values: dict[int, str] = {}
    for key, cplan in plan.components.items():
        for f in cplan.files:
            if f.part == 0:
                continue
            first = next(p for p in cplan.files if p.ranks == f.ranks and p.part == 0)
            if records[key][f.path][3] != records[key][first.path][3]:
                structure[f.writer] = (f"component {key!r}: part {f.part} encodes a different structure "
                                       f"than rank {first.writer}'s part 0")
            elif predictions.get(key, {}).get(f.path) != records[key][f.path][1]:
                values[f.writer] = (f"component {key!r}: part {f.part} (written by rank {f.writer}) holds other "
                                    f"bytes than the same part of rank {first.writer}'s replica")
    if structure:
        raise ReplicationMismatchError(
            "balanced write: replicas hold differently structured state (keys, dtypes, shapes or "
            "non-tensor values), so their parts do not fit together; nothing was committed. "
            "Save with validate=True to see where they differ",
            failures=structure, phase="write",
        )
    if values:
        raise ReplicationMismatchError(
            "balanced write: members writing parts of one replica set held different tensor values when "
            "they wrote (a replica changed after validation, or was never validated), so the parts would "
            "assemble into a state no rank holds; nothing was committed. Save with validate=True to see "
            "where they differ, and do not change the state during a save",
            failures=values, phase="write",
        )


def _diff_declarations(ref: Sequence[Any], mine: Sequence[Any]) -> str:
    ref_by_key = {d[0]: d for d in ref}
    my_by_key = {d[0]: d for d in mine}
    parts = []
    for key in sorted(set(ref_by_key) | set(my_by_key)):
        a, b = ref_by_key.get(key), my_by_key.get(key)
        if a == b:
            continue
        if a is None:
            parts.append(f"declares {key!r} which rank 0 does not")
        elif b is None:
            parts.append(f"does not declare {key!r}")
        else:
            parts.append(f"declares {key!r} as {b[1:]} where rank 0 has {a[1:]}")
    return "; ".join(parts)


def build_manifest(
    plan: SavePlan,
    components: Sequence[StateComponent],
    records: Mapping[str, Mapping[str, Record]],
    validated: Mapping[str, str],
) -> CheckpointManifest:
    """The manifest of a save: the plan's files with the sizes and checksums the writers reported.

    ``validated``: key -> validation level used, for the components the save
    validated. Called on every rank in the commit phase (rank 0 writes it).
    """
    entries: dict[str, ComponentManifest] = {}
    for c in components:
        cplan = plan.components[c.key]
        files = []
        for f in cplan.files:
            size, checksum, writer, _ = records[c.key][f.path]
            files.append(FileEntry(path=f.path, ranks=f.ranks, writer=writer, size_bytes=size, checksum=checksum,
                                   part=f.part, parts=f.parts))
        entries[c.key] = ComponentManifest(
            key=c.key,
            sharing_pattern=c.pattern.kind,
            group_name=c.process_group_name,
            params=c.pattern.params(),
            ranks=cplan.writers,
            replicated_across=cplan.replica_sets,
            files=tuple(files),
            required=c.required,
            validation=validated.get(c.key),
            size_bytes=sum(f.size_bytes for f in files),
            checksum=checksum_of("\n".join(f.checksum for f in files).encode()),
            metadata=dict(c.metadata or {}),
        )
    return CheckpointManifest(
        checkpoint_id=plan.checkpoint_id,
        world_size=plan.topology.world_size,
        timestamp=plan.timestamp,
        components=entries,
        topology=plan.topology.to_dict(),
        sequence=plan.sequence,
        library_version=__version__,
        pytorch_version=torch.__version__,
    )
