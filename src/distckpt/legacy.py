"""Read-only loading of checkpoints written by the original implementation.

Those checkpoints hold one ``torch.save`` file per writer, named
``<key>_state.pt`` (GLOBAL / REPLICATED), ``<key>_state_rank_<r>.pt``
(PER_RANK), ``<key>_state_group_<g>_grank_0_rank_<r>.pt`` (PER_GROUP) and
``<key>_state_node_<n>_rank_<r>.pt`` (PER_NODE), with or without a
``checkpoint_manifest.json``. Each rank picks its file from the *current*
declaration and topology (the file whose writer is in its replica set, never
glob order), and reads it with ``torch.load(weights_only=True)``: never weaker.

:func:`plan_conversion` decides, from those names and the layout a user gives,
the pattern, replica sets and files of each component of the distckpt
checkpoint ``distckpt convert`` writes (pure: no I/O). Every file-system call
goes through :mod:`distckpt.storage`; torch is imported only to read a file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import storage
from .components import StateComponent
from .errors import ComponentMismatchError, IntegrityError, TopologyMismatchError
from .layout import ComponentPlan, plan_component
from .names import check_name
from .patterns import Pattern, registered_patterns, resolve_pattern
from .report import LoadReport
from .topology import Topology, rank_text

__all__ = [
    "LEGACY_MANIFEST",
    "ConversionStep",
    "LegacyFile",
    "is_legacy_checkpoint",
    "legacy_inventory",
    "legacy_pattern",
    "load_legacy",
    "plan_conversion",
    "read_legacy_file",
    "read_legacy_hints",
]

log = logging.getLogger("distckpt")

LEGACY_MANIFEST = "checkpoint_manifest.json"
_LEGACY_MANIFEST_LIMIT = 64 * 1024 * 1024

_GROUP = re.compile(r"(?P<key>.+?)_state_group_(?P<group>.+)_grank_0_rank_(?P<rank>\d+)\.pt")
_NODE = re.compile(r"(?P<key>.+?)_state_node_(?P<node>\d+)_rank_(?P<rank>\d+)\.pt")
_RANK = re.compile(r"(?P<key>.+?)_state_rank_(?P<rank>\d+)\.pt")
_SHARED = re.compile(r"(?P<key>.+?)_state\.pt")


@dataclass(frozen=True)
class LegacyFile:
    """One file of an original-format checkpoint, as its name describes it."""

    name: str
    key: str
    kind: str  # "shared", "rank", "group" or "node"
    writer: int | None = None
    group: str | None = None
    node: int | None = None


def _parse(name: str) -> LegacyFile | None:
    if m := _GROUP.fullmatch(name):
        return LegacyFile(name, m["key"], "group", int(m["rank"]), group=m["group"])
    if m := _NODE.fullmatch(name):
        return LegacyFile(name, m["key"], "node", int(m["rank"]), node=int(m["node"]))
    if m := _RANK.fullmatch(name):
        return LegacyFile(name, m["key"], "rank", int(m["rank"]))
    if m := _SHARED.fullmatch(name):
        return LegacyFile(name, m["key"], "shared")
    return None


def legacy_inventory(path: str) -> list[LegacyFile]:
    """Every original-format file directly in ``path`` (symlinks ignored); ``OSError`` if unlistable."""
    return [parsed for name in storage.list_regular_files(path) if (parsed := _parse(name)) is not None]


def legacy_pattern(kind: str, group: str | None, choice: str | None) -> Pattern:
    """The pattern of a component whose original-format files are of ``kind``.

    Called by ``distckpt convert``. ``choice`` is a pattern kind the user or the
    legacy manifest named; it must be one the original format wrote as ``kind``
    files (a shared file is global or replicated). Without a choice, the first
    registered pattern of that kind (``global`` for shared files). Raises
    ``ValueError`` when the choice contradicts the file names.
    """
    fitting = [cls for cls in registered_patterns().values() if cls.legacy_kind == kind]
    if not fitting:
        raise ValueError(f"no sharing pattern writes original-format {kind!r} files")
    if choice is not None:
        chosen = resolve_pattern(choice, group, field_name="pattern")
        if chosen.legacy_kind != kind:
            raise ValueError(f"its file names say one of {[c.kind for c in fitting]}; pattern {choice!r} "
                             "contradicts them")
        return chosen
    return resolve_pattern(fitting[0].kind, group, field_name="pattern")


def is_legacy_checkpoint(path: str) -> bool:
    """Whether ``path`` looks like an original-format checkpoint."""
    if not storage.path_info(path).dir:
        return False
    return storage.path_info(os.path.join(path, LEGACY_MANIFEST)).file or bool(legacy_inventory(path))


def read_legacy_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; refusals become :class:`IntegrityError`."""
    import torch  # only here: listing and inspecting legacy checkpoints never load torch

    try:
        stream = storage.open_regular_stream(path)  # never follows a symlink, never waits on a FIFO
    except FileNotFoundError:
        raise IntegrityError(f"{path}: legacy file is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{path}: legacy file is a symlink; refusing to follow it") from None
        if exc.errno == errno.EINVAL:
            raise IntegrityError(f"{path}: legacy file is not a regular file") from None
        raise IntegrityError(f"{path}: cannot read legacy file ({exc.strerror or exc})") from None
    try:
        with stream:
            return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IntegrityError(
            f"{path}: refused to load legacy file with weights_only=True ({type(exc).__name__}: {first}); "
            "distckpt never unpickles arbitrary objects"
        ) from None


def _choose(files: Sequence[LegacyFile], c: StateComponent, topology: Topology, rank: int) -> LegacyFile | None:
    """The legacy file of ``c`` that belongs to ``rank``'s replica set: of the kind the
    original format used for the component's pattern, written by a member of the set
    (shared files were written by rank 0), and for group files of the declared group."""
    members = next(s for s in c.pattern.partition(topology) if rank in s)
    if c.pattern.elastic:
        members = tuple(range(topology.world_size))
    groups = c.pattern.params().get("groups")
    candidates = [
        f for f in files
        if f.key == c.key and f.kind == c.pattern.legacy_kind
        and (0 if f.writer is None else f.writer) in members
        and (f.group is None or groups == [f.group])
    ]
    if len(candidates) > 1:
        raise ComponentMismatchError(
            f"component {c.key!r}: several legacy files belong to rank {rank}'s replica set: "
            f"{[f.name for f in candidates]}"
        )
    return candidates[0] if candidates else None


def load_legacy(
    path: str, components: Sequence[StateComponent], topology: Topology, rank: int, strict: bool
) -> LoadReport:
    """Local part of a legacy load on one rank (the coordinator wraps it in a collective).

    Raises :class:`ComponentMismatchError` for a missing required component or
    (strict) undeclared files, :class:`IntegrityError` for unreadable files.
    """
    files = legacy_inventory(path)
    loaded: list[str] = []
    skipped: dict[str, str] = {}
    used: dict[str, str] = {}
    for c in components:
        chosen = _choose(files, c, topology, rank)
        if chosen is None:
            if c.required:
                raise ComponentMismatchError(
                    f"{path}: no legacy file for required component {c.key!r} "
                    f"({c.pattern.describe()}) belongs to rank {rank}"
                )
            skipped[c.key] = "optional component not in checkpoint"
            continue
        c.stateful.load_state_dict(read_legacy_file(os.path.join(path, chosen.name)))
        loaded.append(c.key)
        used[c.key] = chosen.name
    undeclared = sorted({f.key for f in files} - {c.key for c in components})
    if undeclared:
        if strict:
            raise ComponentMismatchError(
                f"{path}: checkpoint holds components nobody declared: {undeclared} (load with strict=False to ignore)"
            )
        skipped.update({k: "in checkpoint but not declared" for k in undeclared})
    return LoadReport(path=path, checkpoint_id=os.path.basename(path), loaded=tuple(loaded),
                      skipped=skipped, files=used, legacy=True)


# ---------------------------------------------------------------- conversion planning


@dataclass(frozen=True)
class ConversionStep:
    """One component of a converted checkpoint: its pattern and files, and where each comes from.

    ``sources`` maps every file of ``plan`` (a path inside the new checkpoint)
    to the original-format file name that holds its state.
    """

    key: str
    pattern: Pattern
    group: str | None
    plan: ComponentPlan
    sources: Mapping[str, str]

    def __post_init__(self) -> None:
        if self.plan.key != self.key:
            raise ValueError(f"ConversionStep {self.key!r}: its plan is for component {self.plan.key!r}")
        if set(self.sources) != {f.path for f in self.plan.files}:
            raise ValueError(f"ConversionStep {self.key!r}: sources must name exactly the plan's files")


def read_legacy_hints(src: str) -> dict[str, Any]:
    """The original's ``checkpoint_manifest.json`` in ``src`` as hints (JSON only, never unpickled).

    Called by ``distckpt convert``. ``{}`` when it is absent, a symlink, not a
    regular file, too large or not a JSON object (logged as a warning).
    """
    path = os.path.join(src, LEGACY_MANIFEST)
    info = storage.path_info(path)
    if not info.file or info.link:
        return {}
    try:
        raw = json.loads(storage.read_small_file(path, _LEGACY_MANIFEST_LIMIT).decode("utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("distckpt: ignoring %s: %s", path, exc)
        return {}
    return raw if isinstance(raw, dict) else {}


def _hint_pattern(hints: Mapping[str, Any], key: str) -> str | None:
    comps = hints.get("components")
    if not isinstance(comps, dict) or not isinstance(comps.get(key), dict):
        return None
    value = comps[key].get("sharing_pattern")
    return value.lower() if isinstance(value, str) else None


def plan_conversion(
    files: Sequence[LegacyFile], topology: Topology, overrides: Mapping[str, str],
    hints: Mapping[str, Any], nodes_given: bool,
) -> list[ConversionStep]:
    """Decide every component's pattern, replica sets and source files. Pure; not collective.

    Called by ``distckpt convert`` (and usable directly) with the inventory of
    an original-format checkpoint (:func:`legacy_inventory`), the layout of the
    job that saved it, patterns chosen per key (``overrides``, e.g.
    ``{"model": "replicated"}``), the legacy manifest's hints
    (:func:`read_legacy_hints`) and whether the node layout was given. Raises
    :class:`TopologyMismatchError` when the layout given cannot explain the
    files (a group or node layout missing, a writer outside the world, a
    replica set with no file or several) and :class:`ComponentMismatchError`
    when the files contradict each other or the patterns chosen.
    """
    by_key: dict[str, list[LegacyFile]] = {}
    for f in files:
        by_key.setdefault(f.key, []).append(f)
    folded: dict[str, str] = {}
    out = []
    for key in sorted(by_key):
        try:
            check_name(key, field_name="component key")
        except ValueError as exc:
            raise ComponentMismatchError(f"legacy component {key!r}: {exc}") from None
        if key.casefold() in folded:
            raise ComponentMismatchError(f"legacy components {folded[key.casefold()]!r} and {key!r} differ only in case")
        folded[key.casefold()] = key
        out.append(_plan_one(key, by_key[key], topology, overrides, hints, nodes_given))
    return out


def _plan_one(
    key: str, group_files: list[LegacyFile], topology: Topology, overrides: Mapping[str, str],
    hints: Mapping[str, Any], nodes_given: bool,
) -> ConversionStep:
    kinds = {f.kind for f in group_files}
    if len(kinds) > 1:
        raise ComponentMismatchError(f"component {key!r}: files of several patterns: {[f.name for f in group_files]}")
    kind = kinds.pop()
    names = sorted({f.group for f in group_files if f.group is not None})
    if len(names) > 1:
        raise ComponentMismatchError(f"component {key!r}: files of several groups {names}")
    group: str | None = names[0] if names else None
    hint = _hint_pattern(hints, key) if kind == "shared" else None
    try:
        pattern = legacy_pattern(kind, group, overrides.get(key) or hint)
    except ValueError as exc:
        raise ComponentMismatchError(f"component {key!r} ({group_files[0].name}): {exc}") from None
    if group is not None and group not in topology.groups:
        raise TopologyMismatchError(
            f"component {key!r} is per_group({group}) in the legacy checkpoint, whose file names record "
            f"only the writer of each group; give the group layout of the job that saved it: "
            f"--mesh {group}=N,... (a row-major device mesh) or --group {group}=0,4/1,5/... (explicit sets)")
    if kind == "node" and not nodes_given:
        raise TopologyMismatchError(
            f"component {key!r} is per_node in the legacy checkpoint, whose file names record only each "
            "node's writer; give the node layout: --nproc-per-node N (torchrun's contiguous ranks) "
            "or --nodes 0-3/4-7")
    try:
        plan = plan_component(topology, key, pattern)
    except TopologyMismatchError as exc:
        raise TopologyMismatchError(f"component {key!r}: {exc}") from None
    sources: dict[str, str] = {}
    if kind == "shared":
        if len(group_files) != 1:
            raise ComponentMismatchError(f"component {key!r}: several shared files {[f.name for f in group_files]}")
        sources[plan.files[0].path] = group_files[0].name
        return ConversionStep(key, pattern, group, plan, sources)
    by_writer: dict[int, LegacyFile] = {}
    for f in group_files:
        assert f.writer is not None
        if not 0 <= f.writer < topology.world_size:
            raise TopologyMismatchError(f"component {key!r}: {f.name} was written by rank {f.writer}, outside the "
                                        f"world of {topology.world_size} ranks (check --world-size)")
        by_writer[f.writer] = f
    for fp in plan.files:
        mine = [by_writer[r] for r in fp.ranks if r in by_writer]
        if not mine:
            raise TopologyMismatchError(
                f"component {key!r}: no legacy file for replica set {{{rank_text(fp.ranks)}}} "
                f"(expected one written by one of those ranks); is the layout right?")
        if len(mine) > 1:
            raise TopologyMismatchError(f"component {key!r}: several legacy files for replica set "
                                        f"{{{rank_text(fp.ranks)}}}: {[f.name for f in mine]}; is the layout right?")
        if kind == "node" and mine[0].node != topology.node_of(fp.writer):
            raise TopologyMismatchError(
                f"component {key!r}: {mine[0].name} says node {mine[0].node}, but the layout "
                f"given puts rank {mine[0].writer} on node {topology.node_of(fp.writer)}")
        sources[fp.path] = mine[0].name
    return ConversionStep(key, pattern, group, plan, sources)
