"""In-place targets: which live tensors can receive a file's bytes directly (no second copy).

Pure: walks a skeleton and a live state dict together, reading neither file
nor tensor data. Called by the load path (:mod:`distckpt.reading`) before it
reads a file; the result becomes :func:`.decoder.assemble`'s ``overrides``.
Malformed skeleton nodes are skipped here (and refused by the decoder); never
raises for content.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import dtensor as _dtensor
from .dtypes import _dtype_name, flat_bytes, span_views
from .header import FileLayout, TensorEntry


@dataclass(frozen=True)
class InPlace:
    """Where a file's entries land in the live state: what :func:`in_place` returns.

    ``indices``: the layout indices of the entries read in place, ascending (file
    order); ``views``: for each, the writable bytes of the live tensor that receives
    it; ``tensors``: entry name -> the tensor :func:`assemble` uses for it (the
    live tensor, or a byte view of it for a dtype safetensors lacks); ``foreign``:
    the live state holds a tensor subclass (a DTensor, say) where the skeleton has
    a tensor, so the caller must run :func:`distckpt.dtensor.check_skeleton`.
    The views do not keep the live tensors alive: the live state must.
    """

    indices: tuple[int, ...]
    views: tuple[memoryview, ...]
    tensors: dict[str, torch.Tensor]
    foreign: bool

    def __post_init__(self) -> None:
        if not len(self.indices) == len(self.views) == len(self.tensors):
            raise ValueError("InPlace: indices, views and tensors differ in length")


def in_place(skeleton: Any, layout: FileLayout, live: Any) -> InPlace:
    """The entries of ``layout`` that can be read straight into ``live`` (a component's state dict).

    Called by the load path (:mod:`distckpt.reading`) for each file before it reads
    it. Walks ``skeleton`` (the file's, or part 0's for a balanced write) and
    ``live`` together, into containers only; an entry qualifies when the live
    tensor at the same path is a plain, contiguous, non-empty CPU tensor of the
    entry's dtype and shape (or, for a dtype safetensors lacks, of the skeleton's
    dtype and shape), and its bytes overlap no other qualifying tensor's (an
    alias, or views of one buffer that overlap, are read once; the other entries
    go to the scratch buffer). Pure; never raises for content.
    """
    names = layout.names
    if skeleton is None:
        return InPlace((), (), {}, False)
    index = dict(zip(names, range(len(names)), strict=True))
    found: list[tuple[str, dict[str, Any], torch.Tensor]] = []
    _pair_tensors(skeleton, live, found)
    begins, ends = layout.begins, layout.ends
    picked, tensors, starts, foreign = _picked_one_by_one(found, layout, index)
    sizes = [ends[i] - begins[i] for i in picked]  # each the live tensor's size in bytes, as checked above
    picked, tensors, starts, sizes = _disjoint_memory(picked, tensors, starts, sizes)
    if any(map(operator.gt, picked[:-1], picked[1:])):  # not in file order: sort by entry index
        order = sorted(range(len(picked)), key=picked.__getitem__)
        picked, tensors = [picked[k] for k in order], [tensors[k] for k in order]
        starts, sizes = [starts[k] for k in order], [sizes[k] for k in order]
    return InPlace(tuple(picked), tuple(span_views(starts, sizes)),
                   dict(zip([names[i] for i in picked], tensors, strict=True)), foreign)


_Choice = tuple[list[int], list[torch.Tensor], list[int], bool]


def _picked_one_by_one(found: list[tuple[str, dict[str, Any], torch.Tensor]], layout: FileLayout,
                       index: dict[str, int]) -> _Choice:
    """The pairs of :func:`in_place` that qualify, tensor by tensor: ``(layout indices, tensors for
    assemble, their data pointers, whether a tensor subclass was met)``, in the order found."""
    dtypes, shapes = layout.dtypes, layout.shapes
    begins, ends = layout.begins, layout.ends
    picked: list[int] = []
    tensors: list[torch.Tensor] = []
    starts: list[int] = []
    foreign = False
    seen: set[str] = set()
    plain = (torch.Tensor, torch.nn.Parameter)
    strided = torch.strided
    for name, node, t in found:
        if type(t) not in plain:
            foreign = True
            continue
        i = index.get(name)
        if i is None or name in seen:
            continue
        if "dtype" not in node:  # stored natively: the same dtype and shape, hence the same bytes
            if (t.dtype is not dtypes[i] or t.shape != shapes[i] or not t.is_cpu or t.layout is not strided
                    or not t.is_contiguous() or t.is_conj() or t.is_neg() or ends[i] == begins[i]):
                continue
            result = t
        else:  # a dtype safetensors lacks: a U8 entry of the tensor's bytes, the real dtype in the skeleton
            if (_dtype_name(t.dtype) != node.get("dtype") or list(t.shape) != node.get("shape") or not t.is_cpu
                    or t.layout is not strided or t.is_quantized or not t.is_contiguous() or t.is_conj()
                    or t.is_neg() or not t.numel() or t.nbytes != ends[i] - begins[i]):
                continue
            result = flat_bytes(t)
        seen.add(name)
        picked.append(i)
        tensors.append(result)
        starts.append(t.data_ptr())
    return picked, tensors, starts, foreign


_Picked = tuple[list[int], list[torch.Tensor], list[int], list[int]]


def _disjoint_memory(picked: list[int], tensors: list[torch.Tensor], starts: list[int], sizes: list[int]) -> _Picked:
    """The candidates whose bytes overlap no earlier candidate's, in the order given.

    Usually nothing overlaps: one sort of the start addresses shows it. Otherwise
    candidates are kept one by one, a later one dropped when its bytes overlap a
    kept one's (it is then read into the scratch buffer and copied by ``load_state_dict``).
    """
    if len(starts) < 2:
        return picked, tensors, starts, sizes
    first = np.array(starts, dtype=np.uint64)
    after = first + np.array(sizes, dtype=np.uint64)
    order = np.argsort(first, kind="stable")
    if bool(np.all(after[order[:-1]] <= first[order[1:]])):
        return picked, tensors, starts, sizes
    kept: list[int] = []
    spans: list[tuple[int, int]] = []
    for k, (start, size) in enumerate(zip(starts, sizes, strict=True)):
        if all(start + size <= a or b <= start for a, b in spans):
            spans.append((start, start + size))
            kept.append(k)
    return ([picked[k] for k in kept], [tensors[k] for k in kept], [starts[k] for k in kept],
            [sizes[k] for k in kept])


def live_targets(skeleton: Any, entries: FileLayout | Iterable[TensorEntry],
                 live: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """As :func:`in_place`, for callers of the earlier interface: ``{entry name: (the live tensor
    whose bytes receive the entry, the tensor to use for that entry in :func:`assemble`)}``. Pure."""
    if isinstance(entries, FileLayout):
        layout = entries
    else:
        listed = list(entries)
        layout = FileLayout(data_start=0, names=tuple(e.name for e in listed), dtypes=tuple(e.dtype for e in listed),
                            shapes=tuple(e.shape for e in listed), begins=tuple(e.begin for e in listed),
                            ends=tuple(e.end for e in listed), skeleton=skeleton)
    found = in_place(skeleton, layout, live)
    return {name: (t, t) for name, t in found.tensors.items()}


def _pair_tensors(node: Any, obj: Any, found: list[tuple[str, dict[str, Any], torch.Tensor]]) -> None:
    """Collect ``(entry name, skeleton node, live tensor)`` for every ``$tensor`` node whose path
    exists in ``obj``; malformed nodes are skipped here (and refused by :func:`assemble`)."""
    kind = type(node)
    if kind is list:
        if isinstance(obj, (list, tuple)) and len(obj) == len(node):
            for n, o in zip(node, obj, strict=True):
                if type(n) is dict or type(n) is list:
                    _pair_tensors(n, o, found)
        return
    if kind is not dict or not node:
        return
    tag = next(iter(node))
    body = node[tag]
    if tag == "$tensor":
        if type(body) is str and isinstance(obj, torch.Tensor):
            found.append((body, node, obj))
    elif tag == "$dict" or tag == "$odict":
        if isinstance(obj, dict) and type(body) is list:
            for pair in body:
                if type(pair) is list and len(pair) == 2:
                    k, v = pair
                    if (type(v) is dict or type(v) is list) and (type(k) is str or type(k) is int) and k in obj:
                        name = v.get("$tensor") if type(v) is dict else None
                        if type(name) is str and type(v) is dict:  # a tensor node, inline
                            o = obj[k]
                            if isinstance(o, torch.Tensor):
                                found.append((name, v, o))
                        else:
                            _pair_tensors(v, obj[k], found)
    elif tag == "$tuple":
        _pair_tensors(body, obj, found)
    elif tag == _dtensor.TAG:
        _pair_tensors(body, _dtensor.live_local(node, obj), found)


