"""In-place targets: which live tensors can receive a file's bytes directly (no second copy).

Pure: walks a skeleton and a live state dict together, reading neither file
nor tensor data. Called by the load path (:mod:`distckpt.reading`) before it
reads a file; the result becomes :func:`.decoder.assemble`'s ``overrides``.
Malformed skeleton nodes are skipped here (and refused by the decoder); never
raises for content.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .. import dtensor as _dtensor
from .dtypes import _dtype_name, flat_bytes
from .header import FileLayout, TensorEntry


def live_targets(skeleton: Any, entries: FileLayout | Iterable[TensorEntry],
                 live: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Tensors of ``live`` (a component's current state dict) that can receive ``entries`` in place.

    Walks ``skeleton`` (the file's, or part 0's for a balanced write) and
    ``live`` together, into containers only; an entry (of a layout, matched by
    its index) qualifies when the live tensor at the same path is a plain,
    contiguous, non-empty CPU tensor of the same dtype and shape, and no other
    entry already targets its storage. Returns ``{entry name: (the live tensor
    whose bytes receive the entry, the tensor to use for that entry in
    :func:`assemble`)}``. Pure.
    """
    if skeleton is None:
        return {}
    if isinstance(entries, FileLayout):
        names, dtypes, shapes = entries.names, entries.dtypes, entries.shapes
        sizes = [end - begin for begin, end in zip(entries.begins, entries.ends, strict=True)]
    else:
        listed = list(entries)
        names = tuple(e.name for e in listed)
        dtypes = tuple(e.dtype for e in listed)
        shapes = tuple(e.shape for e in listed)
        sizes = [e.end - e.begin for e in listed]
    index = dict(zip(names, range(len(names)), strict=True))
    found: list[tuple[str, dict[str, Any], torch.Tensor]] = []
    _pair_tensors(skeleton, live, found)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    storages: set[int] = set()
    for name, node, t in found:
        i = index.get(name)
        kind = type(t)
        if i is None or name in out or not (kind is torch.Tensor or kind is torch.nn.Parameter):
            continue
        if (not t.is_cpu or t.layout is not torch.strided or t.is_quantized or t.is_conj() or t.is_neg()
                or not t.is_contiguous() or t.numel() == 0):
            continue
        if "dtype" not in node:  # stored natively: the same dtype and shape, hence the same bytes
            if t.dtype != dtypes[i] or t.shape != shapes[i]:
                continue
            target = (t, t)
        else:  # a dtype safetensors lacks: a U8 entry of the tensor's bytes, the real dtype in the skeleton
            if _dtype_name(t.dtype) != node["dtype"] or list(t.shape) != node.get("shape"):
                continue
            flat = flat_bytes(t)
            if flat.numel() != sizes[i]:
                continue
            target = (flat, flat)
        storage = t.untyped_storage().data_ptr()
        if storage not in storages:
            storages.add(storage)
            out[name] = target
    return out


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


