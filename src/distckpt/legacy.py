"""Read-only loading of checkpoints written by the original implementation.

Those checkpoints hold one ``torch.save`` file per writer, named
``<key>_state.pt`` (GLOBAL / REPLICATED), ``<key>_state_rank_<r>.pt``
(PER_RANK), ``<key>_state_group_<g>_grank_0_rank_<r>.pt`` (PER_GROUP) and
``<key>_state_node_<n>_rank_<r>.pt`` (PER_NODE), with or without a
``checkpoint_manifest.json``. Each rank picks its file from the *current*
declaration and topology (the file whose writer is in its replica set, never
glob order), and reads it with ``torch.load(weights_only=True)``: never weaker.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .components import StateComponent
from .errors import ComponentMismatchError, IntegrityError
from .patterns import Pattern, registered_patterns, resolve_pattern
from .report import LoadReport
from .topology import Topology

__all__ = [
    "LegacyFile",
    "is_legacy_checkpoint",
    "legacy_inventory",
    "legacy_pattern",
    "load_legacy",
    "read_legacy_file",
]

LEGACY_MANIFEST = "checkpoint_manifest.json"

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
    """Every original-format file directly in ``path`` (symlinks ignored)."""
    out = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.islink(full) or not os.path.isfile(full):
            continue
        parsed = _parse(name)
        if parsed is not None:
            out.append(parsed)
    return out


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
    if not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, LEGACY_MANIFEST)) or bool(legacy_inventory(path))


def read_legacy_file(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; refusals become :class:`IntegrityError`."""
    if os.path.islink(path):
        raise IntegrityError(f"{path}: legacy file is a symlink; refusing to follow it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: legacy file is missing") from None
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
