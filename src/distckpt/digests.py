"""Digests: compare replicas without moving their data.

Pure module. :func:`digest_state` reduces a state dict to ``{entry path:
digest}`` at a :class:`ValidationLevel`; :func:`compare_replicas` groups the
members of each replica set by digest and describes every disagreement. The
same inputs give the same verdict on every rank, which is what lets all ranks
agree to commit or to raise.

Entries are the leaves at any depth (``state.3.exp_avg`` included) plus one
``<structure>`` entry covering container types, keys, dtypes and shapes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from . import dtensor
from .codec import encode_leaf, tensor_bytes
from .components import ValidationLevel

__all__ = [
    "STRUCTURE",
    "Mismatch",
    "compare_replicas",
    "describe_difference",
    "digest_state",
    "entry_name",
    "iter_leaves",
    "quick_sample_indices",
]

STRUCTURE = "<structure>"
_QUICK_SAMPLES = 64
_QUICK_WHOLE_BYTES = 1024 * 1024  # QUICK hashes smaller tensors whole: cheaper than sampling them


_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def entry_name(key: Any) -> str:
    """One path segment: ints and identifier-like strings bare, every other string quoted.

    So ``1`` and ``"1"``, ``"a.b"`` and ``a`` -> ``b``, or ``""`` never share a path,
    and the result is always ASCII-encodable (lone surrogates are escaped).
    """
    if type(key) is str and _BARE_KEY.fullmatch(key):
        return key
    return str(key) if type(key) is int else ascii(key)


def iter_leaves(state: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Yield ``(path, kind, leaf)`` for every leaf, and ``(path, kind, None)`` for containers.

    Paths are dotted :func:`entry_name` segments (``state.3.exp_avg``), unique
    per leaf. ``kind`` is ``"tensor"``, ``"leaf"`` or a container description
    holding its type and keys or length, so structure changes show in the kinds.
    """
    if isinstance(state, torch.Tensor):
        yield path, "tensor", state
    elif isinstance(state, dtensor.SavedDTensor):  # a decoded DTensor (diff): compare its shard
        yield path, "tensor", state.local
    elif type(state) in (dict, OrderedDict):
        names = [entry_name(k) for k in state]
        yield path, f"{type(state).__name__}{names}", None
        for name, v in zip(names, state.values(), strict=True):
            yield from iter_leaves(v, f"{path}.{name}" if path else name)
    elif type(state) in (list, tuple):
        yield path, f"{type(state).__name__}[{len(state)}]", None
        for i, v in enumerate(state):
            yield from iter_leaves(v, f"{path}.{i}" if path else str(i))
    else:
        yield path, "leaf", state


def quick_sample_indices(numel: int, count: int = _QUICK_SAMPLES) -> list[int]:
    """Deterministic flat indices spread over the whole tensor: both ends and evenly between.

    A fixed odd stride is mixed in so that periodic patterns (one column of a
    matrix, say) are not systematically missed.
    """
    if numel <= count:
        return list(range(numel))
    even = {round(i * (numel - 1) / (count // 2 - 1)) for i in range(count // 2)}
    stride = (numel // (count // 2)) | 1
    scattered = {(7919 + i * stride * 2654435761) % numel for i in range(count // 2)}
    return sorted(even | scattered)


@functools.lru_cache(maxsize=256)
def _sample_index(numel: int) -> torch.Tensor:
    return torch.tensor(quick_sample_indices(numel), dtype=torch.long)


@functools.lru_cache(maxsize=4096)
def _prefix(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{dtype}{shape}".encode()


def _tensor_digest(t: torch.Tensor, level: ValidationLevel) -> str:
    """Digest of dtype, shape and bytes (QUICK: of a sample of values when over 1 MiB)."""
    h = xxhash.xxh3_64(_prefix(t.dtype, tuple(t.shape)))
    sample = level is ValidationLevel.QUICK and t.numel() * t.element_size() > _QUICK_WHOLE_BYTES
    if not sample and t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()):
        h.update(tensor_bytes(t))  # the common case: no copy, no conversion
        return h.hexdigest()
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    if sample:
        data = data.reshape(-1)[_sample_index(data.numel())]
    data = data.resolve_conj().resolve_neg().contiguous()
    h.update(tensor_bytes(data))
    return h.hexdigest()


def _leaf_digest(leaf: Any, path: str) -> str:
    node = encode_leaf(leaf, path)
    h = xxhash.xxh3_64(json.dumps(node, sort_keys=True).encode())
    if isinstance(leaf, np.ndarray):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def _record(*fields: Any) -> bytes:
    return json.dumps(fields).encode("ascii") + b"\n"


def digest_state(state: Any, level: ValidationLevel | str) -> dict[str, str]:
    """Digest every leaf of ``state`` at ``level``; local, no collectives.

    QUICK digests tensors by dtype, shape and a sample of values; TENSOR and
    FULL by all their bytes (bf16 and every other dtype alike). Raises
    :class:`~distckpt.errors.SerializationError` for unsupported leaves.
    """
    level = ValidationLevel.coerce(level)
    structure = xxhash.xxh3_64()
    out: dict[str, str] = {}
    for path, kind, leaf in iter_leaves(state):
        if kind == "tensor":
            layout = dtensor.layout_text(leaf)  # a DTensor: its local shard, and its layout in the structure
            leaf = dtensor.local_or_self(leaf)
            structure.update(_record(path, "tensor", str(leaf.dtype), list(leaf.shape), *([layout] if layout else [])))
            out[path] = _tensor_digest(leaf, level)
        elif kind == "leaf":
            structure.update(_record(path, "leaf", type(leaf).__name__))
            out[path] = _leaf_digest(leaf, path)
        else:
            structure.update(_record(path, kind))
    out[STRUCTURE] = structure.hexdigest()
    return out


@dataclass(frozen=True)
class Mismatch:
    """One replica set whose members disagree.

    ``groups`` lists the members grouped by identical digests (largest group
    first, then by lowest rank); ``entries`` the differing paths; ``details``
    (FULL level) how far apart differing tensors are.
    """

    component: str
    replica_set: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    entries: tuple[str, ...]
    details: Mapping[str, str] = field(default_factory=dict)

    def describe(self, max_entries: int = 8) -> str:
        shown = list(self.entries[:max_entries])
        more = len(self.entries) - len(shown)
        listed = ", ".join(shown) + (f" and {more} more" if more > 0 else "")
        grouped = " | ".join(str(list(g)) for g in self.groups)
        text = (
            f"component {self.component!r}: replica set {list(self.replica_set)} differs in "
            f"{len(self.entries)} entr{'y' if len(self.entries) == 1 else 'ies'} ({listed}); "
            f"ranks grouped by digest: {grouped}"
        )
        for entry, detail in self.details.items():
            text += f"; {entry}: {detail}"
        return text


def compare_replicas(
    component: str,
    sets: Sequence[Sequence[int]],
    digests: Mapping[int, Mapping[str, str]],
) -> list[Mismatch]:
    """Compare every member of every replica set with every other member.

    ``digests[rank]`` is that rank's :func:`digest_state` result. Returns one
    :class:`Mismatch` per set whose members do not all agree; deterministic.
    """
    out: list[Mismatch] = []
    for members in sets:
        by_digest: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for rank in members:
            by_digest.setdefault(tuple(sorted(digests[rank].items())), []).append(rank)
        if len(by_digest) <= 1:
            continue
        groups = sorted((tuple(sorted(g)) for g in by_digest.values()), key=lambda g: (-len(g), g[0]))
        paths = sorted({p for rank in members for p in digests[rank]})
        differing = tuple(
            p for p in paths if len({digests[rank].get(p) for rank in members}) > 1
        )
        out.append(Mismatch(component, tuple(members), tuple(groups), differing))
    return out


def describe_difference(a: Any, b: Any) -> str:
    """How far apart two leaves are: max abs difference and differing element count for tensors."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return "values differ"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.numel() == 0:
        return "empty tensors"
    if a.dtype.is_floating_point or a.dtype.is_complex:
        x = a.detach().cpu().to(torch.complex128 if a.dtype.is_complex else torch.float64)
        y = b.detach().cpu().to(x.dtype)
        diff = (x - y).abs()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        differing = int((~same).sum())
        finite = diff[~same & torch.isfinite(diff)]
        biggest = float(finite.max()) if finite.numel() else math.inf
        return f"max abs difference {biggest:.6g}, {differing} of {a.numel()} elements differ"
    differing = int((a.detach().cpu() != b.detach().cpu()).sum())
    if a.dtype is torch.bool:
        return f"{differing} of {a.numel()} elements differ"
    biggest = int((a.detach().cpu().to(torch.int64) - b.detach().cpu().to(torch.int64)).abs().max())
    return f"max abs difference {biggest}, {differing} of {a.numel()} elements differ"
