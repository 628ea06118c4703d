"""Hypothesis strategies for property-testing sharing patterns and trainers.

- :func:`topologies`: worlds of 1 to 16 ranks on nodes of uneven sizes (ranks
  numbered node by node or scattered), with up to three named group
  partitions, each a row-major mesh dimension or an arbitrary partition.
- :func:`state_dicts`: small state dicts of tensors of many dtypes and shapes
  with nested non-tensor leaves.

:class:`StateSpec` is the reproducible form behind a drawn state dict: plain
data (it travels to rank processes as JSON) from which :meth:`StateSpec.build`
makes the same tensors bit for bit, one *variant* per replica set. Used by
:func:`~distckpt.testing.check_pattern`; importable for your own tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from ..topology import Topology

__all__ = ["GROUP_NAMES", "StateSpec", "mesh_partition", "state_dicts", "state_diff", "state_specs", "topologies"]

#: Names drawn for group partitions.
GROUP_NAMES = ("dp", "tp", "pp", "cp", "ep")
_DTYPES = ("float32", "float64", "bfloat16", "float16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "complex64")


def _split(items: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    out, start = [], 0
    for size in sizes:
        out.append(list(items[start:start + size]))
        start += size
    return out


def mesh_partition(world: int, dims: Sequence[int], axis: int) -> list[list[int]]:
    """Groups of mesh dimension ``axis`` of a row-major mesh of shape ``dims`` (last dimension
    fastest): the ranks whose coordinates differ only along ``axis``, in rank order."""
    sets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world):
        coords = []
        rest = rank
        for size in reversed(dims):
            coords.append(rest % size)
            rest //= size
        coords.reverse()
        coords[axis] = 0
        sets.setdefault(tuple(coords), []).append(rank)
    return list(sets.values())


@st.composite
def topologies(draw: st.DrawFn, min_world: int = 1, max_world: int = 16, max_groups: int = 3) -> Topology:
    """A :class:`~distckpt.Topology`: nodes of uneven sizes and up to ``max_groups`` named
    group partitions (names from :data:`GROUP_NAMES`). Shrinks towards one node, one rank."""
    world = draw(st.integers(min_world, max_world), label="world_size")
    cuts = sorted(draw(st.sets(st.integers(1, world - 1), max_size=min(world - 1, 5))) if world > 1 else set())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, world], strict=True)]
    ranks = list(range(world))
    if draw(st.booleans(), label="scattered ranks"):
        ranks = draw(st.permutations(ranks))
    nodes = _split(ranks, sizes)
    names = draw(st.lists(st.sampled_from(GROUP_NAMES), unique=True, max_size=max_groups), label="groups")
    groups: dict[str, list[list[int]]] = {}
    for name in names:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        if draw(st.booleans(), label=f"{name} from a mesh"):
            first = draw(st.sampled_from(divisors))
            dims = [first, world // first]
            groups[name] = mesh_partition(world, dims, draw(st.integers(0, 1)))
        else:
            labels = draw(st.lists(st.integers(0, world - 1), min_size=world, max_size=world), label=name)
            by_label: dict[int, list[int]] = {}
            for rank, label in enumerate(labels):
                by_label.setdefault(label, []).append(rank)
            groups[name] = list(by_label.values())
    return Topology(nodes=nodes, groups=groups)


@dataclass(frozen=True)
class StateSpec:
    """The shape of a state dict: ``tensors`` as ``(name, dtype name, shape)``, plus a seed.

    :meth:`build` makes variant ``v`` of the state: tensors filled from the seed and
    ``v`` (variants differ in every tensor with an element), and nested non-tensor
    leaves that carry ``v`` too. Equal specs and variants give bit-identical states.
    """

    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]
    seed: int

    def build(self, variant: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + variant)
        state: dict[str, Any] = {"anchor": torch.tensor([float(variant), 0.5], dtype=torch.float32)}
        for name, dtype_name, shape in self.tensors:
            dtype = getattr(torch, dtype_name)
            count = math.prod(shape)
            if dtype is torch.bool:
                state[name] = torch.randint(0, 2, shape, generator=gen).to(torch.bool)
                continue
            itemsize = torch.empty((), dtype=dtype).element_size()
            raw = torch.randint(0, 256, (count * itemsize,), dtype=torch.uint8, generator=gen)
            state[name] = raw.view(dtype).reshape(shape)
        state["extra"] = {"step": variant, "name": f"variant-{variant}", "lr": 0.001 * (variant + 1),
                          "betas": [0.9, 0.999], "nothing": None, "flag": variant % 2 == 0}
        return state

    def to_json(self) -> dict[str, Any]:
        return {"tensors": [[n, d, list(s)] for n, d, s in self.tensors], "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StateSpec:
        return cls(tuple((str(n), str(d), tuple(int(x) for x in s)) for n, d, s in data["tensors"]), int(data["seed"]))


@st.composite
def state_specs(draw: st.DrawFn, max_tensors: int = 6, max_elements: int = 64) -> StateSpec:
    """A :class:`StateSpec` of up to ``max_tensors`` tensors (0-3 dimensions, any of many dtypes)."""
    count = draw(st.integers(0, max_tensors))
    tensors = []
    for i in range(count):
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        while math.prod(shape) > max_elements:
            shape = shape[1:]
        tensors.append((f"t{i}", dtype, shape))
    return StateSpec(tuple(tensors), draw(st.integers(0, 2**31 - 1)))


@st.composite
def state_dicts(draw: st.DrawFn, max_tensors: int = 6) -> dict[str, Any]:
    """A state dict of tensors of many dtypes and shapes plus nested non-tensor leaves."""
    return draw(state_specs(max_tensors)).build(draw(st.integers(0, 1000)))


def state_diff(a: Any, b: Any, path: str = "") -> str | None:
    """``None`` when ``a`` and ``b`` are bit-identical (tensors by dtype, shape and bytes;
    everything else by type and value), else where they first differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path or '<root>'}: tensor vs {type(b).__name__ if isinstance(a, torch.Tensor) else type(a).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path or '<root>'}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
        if a.numel() and not torch.equal(_bits(a), _bits(b)):
            return f"{path or '<root>'}: tensor bytes differ"
        return None
    if type(a) is not type(b):
        return f"{path or '<root>'}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path or '<root>'}: keys {list(a)} vs {list(b)}"
        for k in a:
            found = state_diff(a[k], b[k], f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path or '<root>'}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = state_diff(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{path or '<root>'}: {a!r} vs {b!r}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype is not torch.bool else flat.to(torch.uint8)
