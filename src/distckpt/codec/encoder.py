"""The encoder: a state dict to the typed JSON skeleton and the list of its tensors.

Pure: no I/O, no collectives. :func:`encode` is called by the save path
(:mod:`distckpt.saving`, with ``copy``/``reuse`` for async saves) and the
CLI's convert; :func:`encode_leaf` by :mod:`distckpt.digests`;
:func:`state_nbytes` by :mod:`distckpt.coordinator` and the save path. The
common case takes a path-free fast walk (:mod:`.skeletontext`); anything it
cannot take is encoded again by the walk that builds paths, so that a
:class:`SerializationError` names the bad object (``optimizer.state.3.foo``).
DTensors go through :mod:`distckpt.dtensor`'s hooks (their local shard plus
their layout).
"""

from __future__ import annotations

import base64
import json
import math
import operator
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .. import boundedjson
from .. import dtensor as _dtensor
from ..errors import SerializationError
from .dtypes import (
    _NP_KINDS,
    _TO_ST,
    SKELETON_DEPTH,
    SKELETON_KEY,
    _dtype_name,
    _itemsize,
    flat_bytes,
    gc_paused,
)
from .encoded import EncodedState, _header
from .skeletontext import TooDeep, skeleton_text


def _check_tensor(t: torch.Tensor, path: str) -> None:
    """Refuse tensors the format cannot hold, naming their path."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise SerializationError(f"{path}: tensor subclass {type(t).__qualname__} is not serializable")
    if t.layout is not torch.strided:
        raise SerializationError(f"{path}: {t.layout} tensors are not serializable; convert to dense")
    if t.is_quantized:
        raise SerializationError(f"{path}: quantized tensors are not serializable; dequantize first")
    if t.device.type == "meta":
        raise SerializationError(f"{path}: meta tensors hold no data and cannot be saved")


def _plain_cpu(t: torch.Tensor, path: str, copy: bool = False) -> torch.Tensor:
    _check_tensor(t, path)
    out = t.detach()
    if out.device.type != "cpu":
        if copy and torch.cuda.is_available():
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out)
            out = host
        else:
            out = out.cpu()
    if out.is_conj():
        out = out.resolve_conj()
    if out.is_neg():
        out = out.resolve_neg()
    out = out.contiguous()
    if copy and out.numel() and t.device.type == "cpu" and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
        out = out.clone()
    return out



class _Encoder:
    def __init__(self, copy: bool = False, reuse: dict[int, torch.Tensor] | None = None) -> None:
        self.copy = copy
        self.reuse = reuse
        self._ordinal = 0
        # name, data, safetensors dtype, element size of the real dtype (for alignment), bytes
        self.tensors: list[tuple[str, torch.Tensor, str, int, int]] = []
        self.extra: dict[str, dict[str, Any]] = {}
        self._alias: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._by_ptr: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

    def value(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        kind = type(obj)
        if kind is list:
            items = []  # a plain loop: one stack frame per nesting level, as the decoder takes it back
            for i, v in enumerate(obj):
                items.append(self.value(v, f"{path}.{i}"))
            return items
        if kind is tuple:
            items = []
            for i, v in enumerate(obj):
                items.append(self.value(v, f"{path}.{i}"))
            return {"$tuple": items}
        if kind is dict or kind is OrderedDict:
            items = [[self.key(k, path), self.value(v, _join(path, k))] for k, v in obj.items()]
            if kind is dict:
                return {"$dict": items}
            node: dict[str, Any] = {"$odict": items}
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                node["meta"] = self.value(meta, f"{path}._metadata")
            return node
        if kind is _dtensor.HostShard:  # a DTensor of an asynchronous save's host copy
            return _dtensor.encode(obj, path, self.tensor)
        leaf = encode_leaf(obj, path)
        if isinstance(leaf, dict) and "$ndarray" in leaf:
            data = torch.frombuffer(bytearray(np.ascontiguousarray(obj).tobytes()) or bytearray(1), dtype=torch.uint8)
            if obj.nbytes == 0:
                data = data[:0]
            name = self._add(data, "U8", obj.dtype.itemsize)
            leaf["$ndarray"] = name
        return leaf

    def key(self, k: Any, path: str) -> Any:
        if type(k) is str or type(k) is int:
            return k
        raise SerializationError(
            f"{path}: dict key {k!r} of type {type(k).__qualname__} is not serializable (use str or int keys)"
        )

    def tensor(self, t: torch.Tensor, path: str) -> Any:
        kind = type(t)
        if ((kind is torch.Tensor or kind is torch.nn.Parameter) and not self.copy and t.is_cpu
                and t.layout is torch.strided and t.is_contiguous() and t.numel() > 0
                and not (t.is_conj() or t.is_neg() or t.is_quantized)):
            # Fast path, the common case: a plain contiguous CPU tensor, referenced as is.
            # Keyed by its data pointer alone (no tuple per tensor); a second tensor at the
            # same address is an alias only with the same shape, strides and dtype.
            ptr = t.data_ptr()
            seen = self._by_ptr.get(ptr)
            if seen is not None:
                first, node = seen
                if first.shape == t.shape and first.stride() == t.stride() and first.dtype == t.dtype:
                    return dict(node)
            else:
                st = _TO_ST.get(t.dtype)
                if st is not None:
                    fast = {"$tensor": self._add(t, st, _itemsize(t.dtype))}
                    self._by_ptr[ptr] = (t, fast)
                    return fast
        if kind is not torch.Tensor and kind is not torch.nn.Parameter and _dtensor.is_dtensor(t):
            return _dtensor.encode(t, path, self.tensor)  # the local shard, plus its layout
        data = self._snapshot(t, path) if self.reuse is not None else _plain_cpu(t, path, self.copy)
        alias = None
        if t.numel() > 0 and t.layout is torch.strided:
            alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     t.stride(), t.dtype, str(t.device), t.is_conj(), t.is_neg())  # x.imag and x.conj().imag differ
            if alias in self._alias:
                return dict(self._alias[alias])
        st = _TO_ST.get(data.dtype)
        if st is None:
            node = {"$tensor": "", "dtype": _dtype_name(data.dtype), "shape": list(data.shape)}
            raw = flat_bytes(data) if data.numel() else torch.empty(0, dtype=torch.uint8)
            name = self._add(raw, "U8", _itemsize(data.dtype))
        else:
            node = {"$tensor": ""}
            name = self._add(data, st, _itemsize(data.dtype))
        node["$tensor"] = name
        if alias is not None:
            self._alias[alias] = node
        return dict(node)

    def _snapshot(self, t: torch.Tensor, path: str) -> torch.Tensor:
        """Copy ``t`` into the host buffer kept from the previous snapshot when it still fits."""
        _check_tensor(t, path)
        assert self.reuse is not None
        index = self._ordinal
        self._ordinal += 1
        buf = self.reuse.get(index)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pinned = t.device.type == "cuda" and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
            self.reuse[index] = buf
        buf.copy_(t.detach())
        return buf

    def _add(self, data: torch.Tensor, st: str, align: int = 1) -> str:
        name = f"t{len(self.tensors)}"
        self.tensors.append((name, data, st, align, data.numel() * data.element_size()))
        return name


def state_nbytes(state: Any) -> int:
    """Bytes of tensor data in a state dict (nested dicts, lists and tuples), without encoding it. Pure.

    Called by the save's plan phase on every rank (balanced writes are sized by it). Plain tensors
    in a container are counted inline (``nbytes``, no call per tensor); a DTensor counts its shard only.
    """
    kind = type(state)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        return int(state.nbytes)
    if isinstance(state, torch.Tensor):
        shard = _dtensor.local_or_self(state)  # a DTensor stores its shard only
        return shard.numel() * shard.element_size()
    if isinstance(state, dict):
        values: Any = state.values()
    elif isinstance(state, (list, tuple)):
        values = state
    else:
        return 0
    total = 0
    for v in values:
        kind = type(v)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            total += v.nbytes
        elif kind in _SCALARS:
            continue
        else:
            total += state_nbytes(v)
    return total


_SCALARS = frozenset({type(None), bool, int, float, str})


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _nonfinite(value: float) -> dict[str, str]:
    """inf, -inf and every nan (sign and payload included) as their IEEE 754 bits."""
    return {"$float": struct.pack(">d", value).hex()}


def encode_leaf(obj: Any, path: str) -> Any:
    """Skeleton form of a non-container, non-tensor leaf; ndarray data left to the caller.

    Raises :class:`SerializationError` naming ``path`` for unsupported types.
    """
    kind = type(obj)
    if obj is None or kind is bool or kind is int or kind is str:
        return obj
    if kind is float:
        return obj if math.isfinite(obj) else _nonfinite(obj)
    if kind is bytes:
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NP_KINDS or obj.dtype.fields is not None:
            raise SerializationError(f"{path}: NumPy arrays of dtype {obj.dtype} are not serializable")
        return {"$ndarray": None, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in _NP_KINDS:
            raise SerializationError(f"{path}: NumPy scalars of dtype {obj.dtype} are not serializable")
        return {"$npscalar": base64.b64encode(obj.tobytes()).decode("ascii"), "dtype": obj.dtype.str}
    if isinstance(obj, torch.dtype):
        return {"$dtype": _dtype_name(obj)}
    if kind is torch.Size:
        return {"$size": list(obj)}
    if isinstance(obj, torch.device):
        return {"$device": str(obj)}
    raise SerializationError(
        f"{path or '<root>'}: type {kind.__module__}.{kind.__qualname__} is not serializable "
        "(supported: tensors, dict with str/int keys, list, tuple, None, bool, int, float, str, "
        "bytes, NumPy arrays and scalars, torch dtypes)"
    )


_TOO_DEEP = (f"<root>: the state nests containers too deeply to be read back (its skeleton may nest at most "
             f"{SKELETON_DEPTH} JSON levels, about {SKELETON_DEPTH // 3} nested dicts); flatten it")


def encode(state: Any, copy: bool = False, reuse: dict[int, torch.Tensor] | None = None) -> EncodedState:
    """Encode a state dict; raises :class:`SerializationError` naming the first bad path.

    Without ``copy``, contiguous CPU tensors are referenced, not copied (the
    caller writes them before training mutates them). With ``copy`` every
    tensor is snapshotted (into pinned host memory when it lives on a GPU), so
    the result stays valid while training continues: used by async saves.
    ``reuse`` (implies ``copy``) holds the snapshot buffers of a previous
    encode of the same component, by tensor ordinal; buffers whose shape and
    dtype still match are overwritten instead of allocated again. The caller
    must be done with the previous result before reusing its buffers.
    """
    enc = _Encoder(copy or reuse is not None, reuse)
    with gc_paused():  # one pause; the temporaries below are freed before it ends
        try:
            text = None
            if not enc.copy:
                try:
                    text = skeleton_text(enc, state)  # the text itself, depth checked on the way
                except TooDeep:
                    raise SerializationError(_TOO_DEEP) from None
                except SerializationError:  # again, slowly, for the message naming the path
                    enc = _Encoder()
            if text is None:
                text = json.dumps(enc.value(state, ""), separators=(",", ":"), allow_nan=False)
                if boundedjson.nesting_depth(text) > SKELETON_DEPTH:
                    raise SerializationError(_TOO_DEEP)
        except RecursionError:
            raise SerializationError(_TOO_DEEP) from None
        # Largest elements first (by the real dtype, also for raw-stored ones), and
        # data starting 16-aligned: every tensor starts aligned to its element size.
        # (A stable sort: equal sizes keep their traversal order.)
        order = enc.tensors
        if any(item[3] != order[0][3] for item in order):
            order = sorted(order, key=operator.itemgetter(3), reverse=True)
        names = tuple([item[0] for item in order])
        dtypes = tuple([item[2] for item in order])
        tensors = tuple([item[1] for item in order])
        sizes = tuple([item[4] for item in order])
        del order, enc
        header = _header({"format": "pt", SKELETON_KEY: text}, names, dtypes, tensors, sizes)
    return EncodedState(header=header, tensors=tensors, names=names, dtypes=dtypes,
                        skeleton=text, private=copy or reuse is not None, sizes=sizes)

