"""An independent oracle: replica sets, writers and file names from topology alone.

Nothing here imports :mod:`distckpt.layout` or :mod:`distckpt.topology`; it is
DESIGN.md §1 and §3 restated. Also bit-exact comparison of state dicts and a
recomputation of checksums from the bytes on disk.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

if TYPE_CHECKING:
    from tests.property.strategies import Decl, Topo

PATTERNS = ("global", "replicated", "per_rank", "per_node", "per_group")


# ------------------------------------------------------------------ partitions

def node_partition(topo: Topo) -> list[tuple[int, ...]]:
    """Ranks of each node, nodes ordered by their lowest rank."""
    by_label: dict[int, list[int]] = {}
    for rank, label in enumerate(topo.node_of):
        by_label.setdefault(label, []).append(rank)
    return sorted((tuple(sorted(v)) for v in by_label.values()), key=lambda s: s[0])


def mesh_partition(topo: Topo, name: str) -> list[tuple[int, ...]]:
    """Groups of mesh dimension ``name``: ranks that differ only along it (row-major mesh)."""
    names = [n for n, _ in topo.mesh]
    sizes = [s for _, s in topo.mesh]
    grid = np.arange(topo.world_size).reshape(sizes)
    d = names.index(name)
    rows = np.moveaxis(grid, d, -1).reshape(-1, sizes[d])
    return sorted((tuple(sorted(int(x) for x in row)) for row in rows), key=lambda s: s[0])


def replica_sets(topo: Topo, decl: Decl) -> list[tuple[int, ...]]:
    world = tuple(range(topo.world_size))
    if decl.pattern in ("global", "replicated"):
        return [world]
    if decl.pattern == "per_rank":
        return [(r,) for r in world]
    if decl.pattern == "per_node":
        return node_partition(topo)
    assert decl.group is not None
    return mesh_partition(topo, decl.group)


def set_index_of(topo: Topo, decl: Decl, rank: int) -> int:
    return next(i for i, s in enumerate(replica_sets(topo, decl)) if rank in s)


def writer_of(topo: Topo, decl: Decl, rank: int) -> int:
    return min(replica_sets(topo, decl)[set_index_of(topo, decl, rank)])


def variant_of(topo: Topo, decl: Decl, rank: int) -> int:
    """Which content a rank holds: equal within a replica set, different across sets.

    GLOBAL: every rank holds its own (only rank 0's is authoritative).
    """
    if decl.pattern == "global":
        return rank
    return set_index_of(topo, decl, rank)


def file_name(decl: Decl, index: int, writer: int) -> str:
    stem = {
        "global": "global",
        "replicated": "replicated",
        "per_rank": f"rank-{writer:05d}",
        "per_node": f"node-{index:03d}",
        "per_group": f"{decl.group}-{index:03d}",
    }[decl.pattern]
    return f"{decl.key}/{stem}.safetensors"


def expected_files(topo: Topo, decl: Decl) -> list[tuple[str, tuple[int, ...], int]]:
    """(relative path, replica set, writer) of every file of ``decl``, by lowest rank."""
    return [(file_name(decl, i, min(s)), s, min(s)) for i, s in enumerate(replica_sets(topo, decl))]


def checkpoint_files(path: str) -> set[str]:
    """Every regular file under ``path``, relative, with '/' separators."""
    out = set()
    for root, _dirs, files in os.walk(path):
        for f in files:
            out.add(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/"))
    return out


def checksum_of_file(path: str) -> str:
    with open(path, "rb") as f:
        return "xxh3-128:" + xxhash.xxh3_128(f.read()).hexdigest()


# --------------------------------------------------------- bit-exact equality

def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The element bytes of ``t`` in row-major order, using no arithmetic kernel on loaded data.

    Loaded tensors are contiguous views into a file buffer that need not be aligned
    for vectorised kernels (see the complex128 xfail in test_properties), so they are
    only ever re-viewed as bytes; conjugate or strided views are our own tensors.
    """
    if t.numel() == 0:
        return b""
    t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = torch.empty(t.shape, dtype=t.dtype).copy_(t)
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride() != (1,):
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8).numpy().tobytes()


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)  # NaN sign and payload included


def diff(expected: Any, actual: Any, path: str = "") -> str | None:
    """``None`` if ``actual`` is bit-exactly ``expected`` (types, keys, dtypes, shapes, bytes); else where not."""
    where = path or "<root>"
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"{where}: expected a tensor, got {type(actual).__name__}"
        if expected.dtype != actual.dtype or tuple(expected.shape) != tuple(actual.shape):
            return f"{where}: {expected.dtype}{list(expected.shape)} != {actual.dtype}{list(actual.shape)}"
        if _tensor_bytes(expected) != _tensor_bytes(actual):
            return f"{where}: tensor bytes differ"
        return None
    if type(expected) is not type(actual):
        return f"{where}: type {type(expected).__name__} != {type(actual).__name__}"
    if isinstance(expected, (dict, OrderedDict)):
        ek, ak = list(expected), list(actual)
        if [(type(k), k) for k in ek] != [(type(k), k) for k in ak]:
            return f"{where}: keys {ek!r} != {ak!r}"
        for k in ek:
            d = diff(expected[k], actual[k], f"{path}.{k!r}" if path else repr(k))
            if d:
                return d
        if isinstance(expected, OrderedDict) and getattr(expected, "_metadata", None) != getattr(actual, "_metadata", None):
            return f"{where}: OrderedDict metadata differs"
        return None
    if isinstance(expected, (list, tuple)) and not isinstance(expected, torch.Size):
        if len(expected) != len(actual):
            return f"{where}: length {len(expected)} != {len(actual)}"
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            d = diff(e, a, f"{path}.{i}" if path else str(i))
            if d:
                return d
        return None
    if isinstance(expected, np.ndarray):
        if expected.dtype != actual.dtype or expected.shape != actual.shape:
            return f"{where}: ndarray {expected.dtype}{expected.shape} != {actual.dtype}{actual.shape}"
        if np.ascontiguousarray(expected).tobytes() != np.ascontiguousarray(actual).tobytes():
            return f"{where}: ndarray bytes differ"
        return None
    if isinstance(expected, np.generic):
        if expected.dtype != actual.dtype or expected.tobytes() != actual.tobytes():
            return f"{where}: numpy scalar {expected!r} != {actual!r}"
        return None
    if type(expected) is float:
        return None if _float_bits(expected) == _float_bits(actual) else f"{where}: {expected!r} != {actual!r}"
    return None if expected == actual else f"{where}: {expected!r} != {actual!r}"
