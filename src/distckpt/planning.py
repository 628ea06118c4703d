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
  patterns answered alike on every rank; :func:`leader_part_counts` and
  :func:`split_components`: the parts of balanced writes, sized by each
  replica set's lowest rank only.
- :func:`check_parts_agree`: the parts of a balanced write fit together.
- :func:`build_manifest`: the manifest of a save from its plan and the
  write records.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter, itemgetter
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
from .gcpause import gc_paused
from .hashing import checksum_of
from .layout import ComponentPlan, plan_component, split_plan
from .manifest import CheckpointManifest, ComponentManifest, FileEntry
from .planreports import (
    HEAD,
    AgreedWorld,
    decode_reports,
    read_parts,
    report_arrays,
    text_digest,
    with_parts,
)
from .topology import Topology, group_key, groups_digest
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
    "decode_reports",
    "leader_part_counts",
    "local_report",
    "part_counts",
    "plan_components",
    "plan_digest",
    "split_components",
    "validated_components",
    "with_parts",
]

#: key, relative path, encoded file, structure digest (parts only), and for the writer of a
#: balanced write's part 0 the other parts of its own replica (paths and bytes), to predict their checksums
Job = tuple[str, str, EncodedState, str, tuple[tuple[str, EncodedState], ...]]
#: This rank's files to write, as a fresh iterator of jobs on every call.
Produce = Callable[[], Iterator[Job]]
Record = tuple[int, str, int, str]  # size, checksum, writer, structure digest
_DECLARED = itemgetter(slice(0, 8))  # a compact report's declarations digest


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
    agreed: AgreedWorld | None = None  # the world this plan was made in, for the next save's plan phase


def declaration(c: StateComponent) -> tuple[Any, ...]:
    """What every rank must declare alike about a component (compared by :func:`agree`)."""
    return (c.key, c.pattern.describe(), c.required, c.validate_replication, c.validation_level.value)




def local_report(node: str, groups: Mapping[str, tuple[int, ...]],
                 components: Sequence[StateComponent], full: bool = False) -> Any:
    """This rank's part of the first collective of a save or load: node, groups, declarations.

    Compact (the default): ``bytes``, 24 plus a few per group, whatever the
    group and host-name sizes, so what every rank receives grows linearly
    with the world; decoded by :func:`decode_reports` with the group names
    (every rank declares the same ones: they are in the declarations digest).
    ``full=True``: a dict of the member lists and declarations themselves (the
    second round :func:`agree` asks for when digests differ, to name the differences).
    """
    declared = [declaration(c) for c in components]
    if full:
        return {"node": node, "groups": dict(groups), "declarations": declared}
    names = sorted(groups)
    head = HEAD.pack(text_digest(repr((declared, names))), text_digest(node),
                      groups_digest([group_key(groups[n]) for n in names]))
    return with_parts(head, [min(groups[n], default=0) for n in names])


def agree(reports: Sequence[Any], full_reports: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
          phase: str = "plan", names: Sequence[str] = ()) -> Topology:
    """Every rank: check declarations agree, then build the topology. Deterministic.

    Raises :class:`ComponentMismatchError` naming the ranks that declared
    otherwise than rank 0, or :class:`TopologyMismatchError` (from
    :meth:`Topology.from_leaders` or :meth:`Topology.from_reports`) for groups
    that are not partitions; either with ``phase`` set and ``failures`` naming
    every rank when none is singled out. Compact reports (:func:`local_report`)
    are decoded with this rank's sorted group ``names``; when their
    declaration digests or groups disagree, ``full_reports()`` (a collective
    every rank calls, as every rank sees the same reports) fetches the full
    ones to name the differences.
    """
    try:
        return _agree(reports, full_reports, names)
    except CheckpointError as exc:
        raise on_every_rank(exc, phase, len(reports)) from None


def _agree(reports: Sequence[Any], full_reports: Callable[[], Sequence[Mapping[str, Any]]] | None,
           names: Sequence[str]) -> Topology:
    if reports and set(map(type, reports)) == {bytes}:
        short = HEAD.size + len(names)
        odd: list[int] = []
        if min(map(len, reports)) < short or len(set(map(_DECLARED, reports))) != 1:  # C-level; else find them
            odd = [r for r, rep in enumerate(reports) if len(rep) < short or rep[:8] != reports[0][:8]]
        if not odd and len(reports[0]) >= short:
            try:
                return Topology.from_label_arrays(*report_arrays(reports, names))
            except TopologyMismatchError:
                if full_reports is None:
                    raise
        elif full_reports is None:
            raise ComponentMismatchError(
                "ranks declared different components or process group names; every rank must declare "
                "the same keys, patterns, groups and validation",
                failures=dict.fromkeys(odd or range(len(reports)), "declares otherwise than rank 0"))
        assert full_reports is not None
        reports = full_reports()
    declared = [tuple(r["declarations"]) for r in reports]
    if any(d != declared[0] for d in declared):
        raise ComponentMismatchError(
            "ranks declared different components; every rank must declare the same keys, "
            "patterns, groups and validation",
            failures={rank: _diff_declarations(declared[0], d) for rank, d in enumerate(declared)
                      if d != declared[0]},
        )
    return Topology.from_reports([r["node"] for r in reports], [r["groups"] for r in reports])


def plan_components(topology: Topology, components: Sequence[StateComponent]) -> dict[str, ComponentPlan]:
    """Each component's files from its pattern, one file per replica set (no balanced writes yet:
    :func:`split_components` splits the large sets once their lowest ranks have sized them).

    Runs the patterns' own code, which may raise or answer differently on
    some rank: the save phase runs it inside a collective and compares
    :func:`plan_digest` across ranks.
    """
    with gc_paused():  # one FilePlan per set: 65,536 of them for PER_RANK at 65,536 ranks
        return {c.key: plan_component(topology, c.key, c.pattern) for c in components}


def part_counts(nbytes: int, min_part_bytes: int, world_size: int) -> int:
    """How many ``min_part_bytes`` a state of ``nbytes`` holds, at most the world size (a replica set
    never has more members): all that decides a balanced write (:func:`distckpt.layout.part_writers`)."""
    return min(nbytes // min_part_bytes, world_size) if min_part_bytes > 0 else 0


def leader_part_counts(rank: int, world_size: int, components: Sequence[StateComponent],
                       plans: Mapping[str, ComponentPlan], size_of: Callable[[str], int],
                       min_part_bytes: int) -> bytes:
    """This rank's share of the sizes a balanced write needs, per component in order: the
    :func:`part_counts` of its state where it is the lowest rank of its replica set and the
    pattern has identical replicas (only that rank's size decides the set's parts), else 0;
    as varints (:func:`~distckpt.planreports.with_parts`), empty when all are 0. ``size_of(key)`` (this rank's state of ``key`` in bytes) is called
    only for those components, so the other ranks never walk their state to plan a save.

    ``plans``: the whole-file plans (:func:`plan_components`). Called by the save's plan phase
    inside a collective: the second, or the first when a rank plans on the world it kept
    (:func:`distckpt.saving.plan`); an error of ``size_of`` reaches every rank.
    """
    counts = tuple(part_counts(size_of(c.key), min_part_bytes, world_size)
                   if c.pattern.identical_replicas and rank in plans[c.key].writers else 0
                   for c in components)
    return with_parts(b"", counts) if any(counts) else b""


def split_components(topology: Topology, components: Sequence[StateComponent],
                     plans: Mapping[str, ComponentPlan], sent: Sequence[bytes],
                     min_part_bytes: int) -> dict[str, ComponentPlan]:
    """The whole-file ``plans`` with each large enough replica set split into parts, from what
    every rank sent (``sent[rank]``, :func:`leader_part_counts`). Pure and deterministic: every
    rank gets the same answer from the same gathered bytes."""
    counts = {rank: read_parts(data) for rank, data in enumerate(sent) if data}
    empty: tuple[int, ...] = ()
    out = dict(plans)
    for index, c in enumerate(components):  # split_plan leaves a pattern without identical replicas whole
        sizes = {f.ranks[0]: mine[index] * min_part_bytes for f in plans[c.key].files
                 if index < len(mine := counts.get(f.ranks[0], empty)) and mine[index]}
        if sizes:
            out[c.key] = split_plan(topology, plans[c.key], sizes, min_part_bytes)
    return out


def plan_digest(plans: Mapping[str, ComponentPlan]) -> int:
    """A 64-bit digest of every component's files, compared across ranks by :func:`check_same_plan`."""
    text = repr(sorted((key, [(f.path, f.ranks, f.writer) for f in p.files]) for key, p in plans.items()))
    return text_digest(text)


def check_same_plan(digests: Sequence[int], components: Sequence[StateComponent]) -> None:
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


_PATH, _RANKS, _PARTS, _PART_PAIR = attrgetter("path"), attrgetter("ranks"), attrgetter("parts"), attrgetter("part", "parts")
_SIZE, _CHECKSUM, _WRITER = itemgetter(0), itemgetter(1), itemgetter(2)  # of a Record


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
    with gc_paused():  # some 75,000 entries at 65,536 ranks, none in a cycle
        return _build_manifest(plan, components, records, validated)


def _build_manifest(plan: SavePlan, components: Sequence[StateComponent], records: Mapping[str, Mapping[str, Record]],
                    validated: Mapping[str, str]) -> CheckpointManifest:
    entries: dict[str, ComponentManifest] = {}
    for c in components:
        cplan = plan.components[c.key]
        paths = list(map(_PATH, cplan.files))
        written = list(map(records[c.key].__getitem__, paths))  # size, checksum, writer, structure digest
        sizes, checksums = list(map(_SIZE, written)), list(map(_CHECKSUM, written))
        whole = set(map(_PARTS, cplan.files)) <= {1}
        files = FileEntry._many(paths, list(map(_RANKS, cplan.files)), list(map(_WRITER, written)), sizes, checksums,
                                None if whole else list(map(_PART_PAIR, cplan.files)))
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
            size_bytes=sum(sizes),
            checksum=checksum_of("\n".join(checksums).encode()),
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
