"""Comparing two committed checkpoints, from Python or the CLI.

:func:`diff_checkpoints` walks both manifests component by component and
replica set by replica set. Files whose recorded size and checksum agree are
only checked on disk (streamed through their hash, never decoded); the others
are read, verified and decoded, and their entries compared one by one, with
the largest absolute difference for tensors. Not collective; reads only.
``distckpt diff`` prints its report.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import codec, storage
from .digests import describe_difference, iter_leaves
from .errors import CheckpointError, IntegrityError
from .manifest import ComponentManifest, FileEntry
from .reading import read_component
from .topology import Partition
from .verification import open_checkpoint

__all__ = ["ComponentDiff", "DiffReport", "FileDiff", "compare_states", "diff_checkpoints"]


@dataclass(frozen=True)
class FileDiff:
    """How one replica set's file differs: ``only_in`` ``"A"`` or ``"B"`` when the set
    exists on one side only; otherwise its ranks on each side and one line per
    differing entry (``entries``)."""

    path: str
    only_in: str | None = None
    ranks_a: tuple[int, ...] = ()
    ranks_b: tuple[int, ...] = ()
    entries: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.only_in not in (None, "A", "B"):
            raise ValueError(f"FileDiff.only_in must be None, 'A' or 'B', not {self.only_in!r}")


@dataclass(frozen=True)
class ComponentDiff:
    """How one component differs. ``pattern_a``/``pattern_b`` describe its pattern on each
    side (``None`` where it is absent); when they differ its files are not compared."""

    key: str
    pattern_a: str | None
    pattern_b: str | None
    replica_sets_a: Partition = ()
    replica_sets_b: Partition = ()
    files: tuple[FileDiff, ...] = ()

    def __post_init__(self) -> None:
        if self.pattern_a is None and self.pattern_b is None:
            raise ValueError(f"ComponentDiff {self.key!r}: present on neither side")

    @property
    def only_in(self) -> str | None:
        """``"A"`` or ``"B"`` when the component is in one checkpoint only."""
        if self.pattern_b is None:
            return "A"
        return "B" if self.pattern_a is None else None


@dataclass(frozen=True)
class DiffReport:
    """What :func:`diff_checkpoints` found: ``same`` when nothing differs.

    ``components`` lists every key of either checkpoint; ``differences`` only
    those that differ, in that order.
    """

    a: str
    b: str
    checkpoint_id_a: str
    checkpoint_id_b: str
    world_size_a: int
    world_size_b: int
    components: tuple[str, ...]
    differences: tuple[ComponentDiff, ...]
    files_a: int

    def __post_init__(self) -> None:
        unknown = {d.key for d in self.differences} - set(self.components)
        if unknown:
            raise ValueError(f"DiffReport: differences for components it does not list: {sorted(unknown)}")

    @property
    def same(self) -> bool:
        return not self.differences and self.world_size_a == self.world_size_b


def diff_checkpoints(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> DiffReport:
    """Compare the checkpoints at ``a`` and ``b`` (directories or their ``manifest.json``).

    Not collective; reads only; memory holds one replica set's state per side
    at a time. Raises :class:`CheckpointNotFoundError` or :class:`ManifestError`
    when either is not a readable committed checkpoint, and
    :class:`IntegrityError` naming the file when a file to compare is missing
    or damaged (a differing checkpoint is not an error: see ``same``).
    """
    pa, ma = open_checkpoint(a)
    pb, mb = open_checkpoint(b)
    keys = tuple(sorted(set(ma.components) | set(mb.components)))
    differences: list[ComponentDiff] = []
    for key in keys:
        ca, cb = ma.components.get(key), mb.components.get(key)
        if ca is None or cb is None:
            differences.append(ComponentDiff(key, None if ca is None else ca.describe_pattern(),
                                             None if cb is None else cb.describe_pattern()))
            continue
        diff = _diff_component(pa, ca, pb, cb)
        if diff is not None:
            differences.append(diff)
    return DiffReport(pa, pb, ma.checkpoint_id, mb.checkpoint_id, ma.world_size, mb.world_size, keys,
                      tuple(differences), sum(len(c.files) for c in ma.components.values()))


def _sets_of(comp: ComponentManifest) -> dict[str, list[FileEntry]]:
    """Files by replica set, named by the set's first file; parts of a balanced write in order."""
    by_ranks: dict[tuple[int, ...], list[FileEntry]] = {}
    for f in comp.files:
        by_ranks.setdefault(f.ranks, []).append(f)
    return {group[0].path: group for group in (sorted(g, key=lambda f: f.part) for g in by_ranks.values())}


def _diff_component(pa: str, ca: ComponentManifest, pb: str, cb: ComponentManifest) -> ComponentDiff | None:
    key = ca.key
    if ca.describe_pattern() != cb.describe_pattern():
        return ComponentDiff(key, ca.describe_pattern(), cb.describe_pattern())
    files: list[FileDiff] = []
    fa, fb = _sets_of(ca), _sets_of(cb)
    for path in list(fa) + [p for p in fb if p not in fa]:
        if path not in fb or path not in fa:
            files.append(FileDiff(path, only_in="A" if path in fa else "B"))
            continue
        ga, gb = fa[path], fb[path]
        if [(f.path, f.size_bytes, f.checksum) for f in ga] == [(f.path, f.size_bytes, f.checksum) for f in gb]:
            # Same recorded content: only make sure both files still hold it.
            for side, root, group in (("A", pa, ga), ("B", pb, gb)):
                for entry in group:
                    fault = storage.check_file(storage.safe_join(root, entry.path), entry.size_bytes, entry.checksum)
                    if fault is not None:
                        problem = "missing" if fault.kind == "missing" else fault.message
                        raise IntegrityError(f"cannot compare {entry.path}: {side}'s copy is damaged ({problem}); "
                                             f"run `distckpt verify` on it")
            continue
        try:
            entries = compare_states(read_component(pa, ga), read_component(pb, gb))
        except CheckpointError as exc:
            raise IntegrityError(f"cannot compare {path}: {exc} (check both with `distckpt verify`)") from None
        if ga[0].ranks != gb[0].ranks or entries:
            files.append(FileDiff(path, None, ga[0].ranks, gb[0].ranks, tuple(entries)))
    sets_a, sets_b = tuple(ca.replicated_across), tuple(cb.replicated_across)
    if not files and sets_a == sets_b:
        return None
    return ComponentDiff(key, ca.describe_pattern(), cb.describe_pattern(), sets_a, sets_b, tuple(files))


def _leaf_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x = a.detach().cpu().contiguous()
    y = b.detach().cpu().contiguous()
    return bytes(codec.tensor_bytes(x)) == bytes(codec.tensor_bytes(y))


def _value_text(v: Any, kind: str) -> str:
    if kind == "tensor":
        return f"tensor {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    if kind != "leaf":
        return kind.split("[", 1)[0]
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def compare_states(a: Any, b: Any) -> list[str]:
    """Every entry that differs between two decoded states, one line each (A's order, then B's). Pure."""
    la = {p: (kind, leaf) for p, kind, leaf in iter_leaves(a)}
    lb = {p: (kind, leaf) for p, kind, leaf in iter_leaves(b)}
    order = list(la) + [p for p in lb if p not in la]
    out: list[str] = []
    gone: list[str] = []

    def under_gone(p: str) -> bool:
        return any(p.startswith(g + ".") or g == "" for g in gone)

    for p in order:
        name = p or "<root>"
        if under_gone(p):
            continue
        if p not in lb or p not in la:
            side = "A" if p in la else "B"
            kind, leaf = la[p] if p in la else lb[p]
            out.append(f"{name}: only in {side} ({_value_text(leaf, kind)})")
            gone.append(p)
            continue
        (ka, va), (kb, vb) = la[p], lb[p]
        if ka == "tensor" and kb == "tensor":
            if not _tensor_equal(va, vb):
                out.append(f"{name}: {describe_difference(va, vb)}")
        elif ka not in ("tensor", "leaf") and kb not in ("tensor", "leaf"):
            ta, tb = ka.split("[", 1)[0], kb.split("[", 1)[0]
            if ta != tb:
                out.append(f"{name}: {ta} in A, {tb} in B")
        elif ka != kb:
            out.append(f"{name}: {_value_text(va, ka)} in A, {_value_text(vb, kb)} in B")
            gone.append(p)
        elif not _leaf_equal(va, vb):
            out.append(f"{name}: {_value_text(va, ka)} in A, {_value_text(vb, kb)} in B")
    return out
