"""The decoder: safetensors bytes (one file, or the parts of a balanced write) back to a state dict.

Pure: works on buffers in memory. Called by the load path
(:mod:`distckpt.reading`: :func:`assemble` with in-place ``overrides`` from
:func:`.targets.live_targets`) and tests (:func:`decode`, a whole file in
memory). Tensors are views of the buffer (aligned copies where the
buffer is not aligned); DTensor nodes go through :mod:`distckpt.dtensor`.
Malformed content raises :class:`IntegrityError` naming the file; nothing is
unpickled.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .. import dtensor as _dtensor
from ..errors import IntegrityError
from .dtypes import _NP_KINDS, _dtype_from_name, _itemsize, _shape, gc_paused, tensor_bytes
from .header import FileLayout, TensorEntry, header_length, parse_header


def decode(buffer: bytearray | memoryview, where: str = "<buffer>") -> Any:
    """Rebuild a state dict from a whole safetensors file held in ``buffer``.

    Tensors are views into ``buffer`` (no copy). A file without a distckpt
    skeleton (plain safetensors) decodes to ``{name: tensor}``. Raises
    :class:`IntegrityError` naming ``where`` when the bytes are not a valid file.
    """
    view = memoryview(buffer)
    layout = parse_header(view[:header_length(view[:8], len(view), where)], len(view), where)
    return assemble([(layout, buffer)], where=where)


def assemble(parts: Sequence[tuple[FileLayout, bytearray | memoryview]],
             overrides: dict[str, torch.Tensor] | None = None, where: str = "<buffer>") -> Any:
    """Rebuild a state dict from one file, or from the parts of a balanced write, in part order.

    Each part is its parsed layout and a buffer holding the whole part file.
    ``overrides`` maps tensor names to tensors that already hold the data (read
    in place, see :func:`live_targets`); their buffer bytes are not used.
    Raises :class:`IntegrityError` naming ``where`` on malformed content.
    """
    overrides = overrides or {}
    try:
        with gc_paused():
            tensors: dict[str, torch.Tensor] = {}
            for layout, buffer in parts:
                _tensors_of(layout, buffer, overrides, tensors)
            skeleton = parts[0][0].skeleton
            if skeleton is None:
                return tensors
            return _Decoder(tensors).value(skeleton)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError, struct.error) as exc:
        raise IntegrityError(f"{where}: malformed safetensors content ({exc})"[:400]) from None


def _tensors_of(layout: FileLayout, buffer: bytearray | memoryview, overrides: dict[str, torch.Tensor],
                out: dict[str, torch.Tensor]) -> None:
    """Add ``layout``'s tensors to ``out``: the override where there is one, else a view of
    ``buffer`` (aligned to its element size, copied where the buffer is not). Consecutive
    entries of one dtype are cut from one view of the buffer (one call per run, not per tensor)."""
    names, dtypes, shapes, begins, ends = layout.names, layout.dtypes, layout.shapes, layout.begins, layout.ends
    count = len(names)
    if count and len(overrides) >= count and overrides.keys() >= set(names):  # all read in place
        if not out.keys().isdisjoint(names):
            raise IntegrityError(f"tensor {next(n for n in names if n in out)!r} appears twice")
        out.update(zip(names, map(overrides.__getitem__, names), strict=True))
        return
    i = 0
    while i < count:
        name = names[i]
        if name in out:
            raise IntegrityError(f"tensor {name!r} appears twice")
        if name in overrides:
            out[name] = overrides[name]
            i += 1
            continue
        dtype = dtypes[i]
        j = i + 1  # a run: same dtype, back to back, no override, not empty
        while (j < count and dtypes[j] is dtype and begins[j] == ends[j - 1] and ends[j] > begins[j]
               and ends[i] > begins[i] and names[j] not in overrides):
            j += 1
        if j - i == 1:
            out[name] = _aligned(_tensor_at(buffer, TensorEntry(name, dtype, shapes[i], begins[i], ends[i])))
            i += 1
            continue
        size = _itemsize(dtype)
        base = torch.frombuffer(buffer, dtype=dtype, count=(ends[j - 1] - begins[i]) // size, offset=begins[i])
        if base.data_ptr() % min(size, 16):
            base = base.clone()  # a fresh allocation is aligned
        pieces = torch.split(base, [(ends[k] - begins[k]) // size for k in range(i, j)])
        for k in range(i, j):
            if names[k] in out:
                raise IntegrityError(f"tensor {names[k]!r} appears twice")
            piece = pieces[k - i]
            shape = shapes[k]
            out[names[k]] = piece if len(shape) == 1 else piece.view(shape)
        i = j


def _np_dtype(node: dict[str, Any]) -> np.dtype[Any]:
    """The NumPy dtype of an ``$ndarray`` or ``$npscalar`` node: only the kinds :func:`encode_leaf` writes."""
    name = node["dtype"]
    dtype = np.dtype(name) if type(name) is str else None
    if dtype is None or dtype.kind not in _NP_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise ValueError(f"unsupported NumPy dtype {name!r}"[:200])
    return dtype


def _pairs(body: Any) -> list[tuple[Any, Any]]:
    """A skeleton dict body: a list of ``[key, value]`` pairs, keys str or int."""
    if type(body) is not list:
        raise ValueError(f"a dict body must be a list of pairs, got {type(body).__name__}")
    for pair in body:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int):
            raise ValueError(f"a dict entry must be [str or int key, value], got {pair!r}"[:200])
    return [(k, v) for k, v in body]


def _tensor_at(buffer: bytearray | memoryview, e: TensorEntry) -> torch.Tensor:
    if e.end == e.begin:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(buffer, dtype=e.dtype, count=math.prod(e.shape), offset=e.begin).reshape(e.shape)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its data is aligned to its element size (16 at most), else an aligned copy.

    Vectorised kernels may crash on misaligned data (a complex128 view at an
    8-byte boundary); files from other writers give no alignment guarantee.
    """
    if t.numel() and t.data_ptr() % min(t.element_size(), 16):
        return t.clone()
    return t


_ATOMS = (str, int, float, bool)


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._raw: dict[str, torch.Tensor] = {}

    def value(self, node: Any) -> Any:
        kind = type(node)
        if kind is dict and node:
            tag = next(iter(node))
            body = node[tag]
            if tag == "$dict":
                if type(body) is not list:
                    raise ValueError(f"a dict body must be a list of pairs, got {type(body).__name__}")
                out_dict: dict[Any, Any] = {}
                tensors = self.tensors
                for pair in body:
                    if type(pair) is not list or len(pair) != 2:
                        raise ValueError(f"a dict entry must be [str or int key, value], got {pair!r}"[:200])
                    k, v = pair
                    if type(k) is not str and type(k) is not int:
                        raise ValueError(f"a dict entry must be [str or int key, value], got {pair!r}"[:200])
                    kind = type(v)
                    if kind is dict:
                        name = v.get("$tensor") if len(v) == 1 else None
                        # a natively stored tensor, inline
                        out_dict[k] = tensors[name] if type(name) is str else self.value(v)
                    elif v is None or kind in _ATOMS:
                        out_dict[k] = v
                    else:
                        out_dict[k] = self.value(v)
                return out_dict
            if tag == "$tensor":
                name = body
                if "dtype" not in node and type(name) is str:
                    return self.tensors[name]
                return self.tensor(node)
            return self.tagged(tag, body, node)
        if node is None or kind in _ATOMS:
            return node
        if kind is list:
            items = []  # a plain loop: one stack frame per nesting level (a comprehension takes two)
            for v in node:
                items.append(self.value(v))
            return items
        raise ValueError(f"unexpected skeleton node {node!r}"[:200])

    def tagged(self, tag: str, body: Any, node: dict[str, Any]) -> Any:
        if tag == _dtensor.TAG:
            return _dtensor.decode(node, self.value)
        if tag == "$odict":
            out: OrderedDict[Any, Any] = OrderedDict((k, self.value(v)) for k, v in _pairs(body))
            if "meta" in node:
                out._metadata = self.value(node["meta"])  # type: ignore[attr-defined]
            return out
        if tag == "$tuple":
            if type(body) is not list:
                raise ValueError(f"a tuple body must be a list, got {type(body).__name__}")
            items = []
            for v in body:
                items.append(self.value(v))
            return tuple(items)
        if tag == "$float":
            if type(body) is not str or len(body) != 16:
                raise ValueError(f"$float must be 16 hex digits, got {body!r}"[:200])
            return struct.unpack(">d", bytes.fromhex(body))[0]
        if tag == "$bytes":
            return base64.b64decode(body, validate=True)
        if tag == "$ndarray":
            raw = self.tensors[body]
            return np.frombuffer(bytes(tensor_bytes(raw)), dtype=_np_dtype(node)).reshape(_shape(node["shape"])).copy()
        if tag == "$npscalar":
            data = base64.b64decode(body, validate=True)
            dtype = _np_dtype(node)
            if len(data) != dtype.itemsize:
                raise ValueError(f"a NumPy {dtype} scalar needs {dtype.itemsize} bytes, got {len(data)}")
            return np.frombuffer(data, dtype=dtype)[0]
        if tag == "$dtype":
            return _dtype_from_name(body)
        if tag == "$size":
            return torch.Size(_shape(body))
        if tag == "$device":
            if type(body) is not str:
                raise ValueError(f"a device must be a string, got {body!r}"[:200])
            return torch.device(body)
        raise ValueError(f"unknown skeleton tag {tag!r}")

    def tensor(self, node: dict[str, Any]) -> torch.Tensor:
        name = node["$tensor"]
        if "dtype" not in node:
            return self.tensors[name]
        if name not in self._raw:
            dtype = _dtype_from_name(node["dtype"])
            raw = self.tensors[name]
            shape = _shape(node["shape"])
            if raw.numel() == 0:
                if math.prod(shape):  # never allocate what the file does not hold
                    raise ValueError(f"tensor {name!r} of shape {list(shape)} has no bytes in the file")
                self._raw[name] = torch.empty(shape, dtype=dtype)
            else:
                if raw.data_ptr() % min(_itemsize(dtype), 16):
                    raw = raw.clone()  # a fresh allocation is aligned; view it as the real dtype
                self._raw[name] = raw.view(dtype).reshape(shape)
        return self._raw[name]
