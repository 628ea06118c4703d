"""Codec: state dicts to safetensors bytes and back, without pickle.

Pure module: builds and parses bytes in memory; :mod:`distckpt.storage` streams
them to disk. Tensor leaves become safetensors tensors; everything else (nested
dicts with int or str keys, lists, tuples, None, bool, int, float including
inf/nan, str, bytes, NumPy arrays and scalars, torch dtypes, sizes and devices)
becomes a typed JSON *skeleton* stored in the safetensors metadata under
``distckpt.skeleton``. An object outside that set raises
:class:`SerializationError` naming its path (``optimizer.state.3.foo``).

Skeleton grammar: JSON null/bool/int/str/list stand for themselves, finite
floats are JSON numbers, and every other value is a one-tag object such as
``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` or ``{"$tensor": "t7"}``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gc
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import IntegrityError, SerializationError

__all__ = [
    "SKELETON_KEY",
    "EncodedState",
    "decode",
    "encode",
    "encode_leaf",
    "flat_bytes",
    "tensor_bytes",
]

SKELETON_KEY = "distckpt.skeleton"
_HEADER_LIMIT = 100 * 1024 * 1024

_ST_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}
_FROM_ST: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _ST_NAMES.items() if hasattr(torch, name)
}
_TO_ST: dict[torch.dtype, str] = {dt: st for st, dt in _FROM_ST.items()}
_NP_KINDS = set("biufcUSMm")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise IntegrityError(f"unknown torch dtype {name!r} in checkpoint")
    return dtype


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects (halves encode/decode time
    for states of thousands of tensors); restores whatever state it found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 view of a contiguous CPU tensor's bytes, without copying.

    A one-element tensor can be "contiguous" with any stride (``x[::2]`` of a
    two-element ``x``); it is re-viewed with stride 1 first.
    """
    flat = t.detach().reshape(-1)
    if flat.numel() == 1 and flat.stride() != (1,):
        flat = flat.as_strided((1,), (1,))
    return flat.view(torch.uint8)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, without copying."""
    if t.numel() == 0:
        return memoryview(b"")
    array: Any = flat_bytes(t).numpy()
    return memoryview(array).cast("B")


def _check_tensor(t: torch.Tensor, path: str) -> None:
    """Refuse tensors the format cannot hold, naming their path."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        hint = " (DTensor: save t.to_local() or t.full_tensor())" if type(t).__name__ == "DTensor" else ""
        raise SerializationError(f"{path}: tensor subclass {type(t).__qualname__} is not serializable{hint}")
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


@dataclass(frozen=True)
class EncodedState:
    """A state dict ready to stream: the safetensors header and the tensors in file order."""

    header: bytes
    tensors: tuple[torch.Tensor, ...]

    @property
    def total_size(self) -> int:
        """Exact size in bytes of the file these chunks make."""
        return len(self.header) + sum(t.numel() * t.element_size() for t in self.tensors)

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes, header first, without copying tensor data."""
        yield memoryview(self.header)
        for t in self.tensors:
            if t.numel():
                yield tensor_bytes(t)

    def to_bytes(self) -> bytes:
        """The whole file in memory (tests and small states)."""
        return b"".join(bytes(c) for c in self.chunks())


class _Encoder:
    def __init__(self, copy: bool = False, reuse: dict[int, torch.Tensor] | None = None) -> None:
        self.copy = copy
        self.reuse = reuse
        self._ordinal = 0
        # name, data, safetensors dtype, element size of the real dtype (for alignment)
        self.tensors: list[tuple[str, torch.Tensor, str, int]] = []
        self.extra: dict[str, dict[str, Any]] = {}
        self._alias: dict[tuple[Any, ...], dict[str, Any]] = {}

    def value(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        kind = type(obj)
        if kind is list:
            return [self.value(v, f"{path}.{i}") for i, v in enumerate(obj)]
        if kind is tuple:
            return {"$tuple": [self.value(v, f"{path}.{i}") for i, v in enumerate(obj)]}
        if kind is dict or kind is OrderedDict:
            items = [[self.key(k, path), self.value(v, _join(path, k))] for k, v in obj.items()]
            if kind is dict:
                return {"$dict": items}
            node: dict[str, Any] = {"$odict": items}
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                node["meta"] = self.value(meta, f"{path}._metadata")
            return node
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
        data = self._snapshot(t, path) if self.reuse is not None else _plain_cpu(t, path, self.copy)
        alias = None
        if t.numel() > 0 and t.layout is torch.strided:
            alias = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     t.stride(), t.dtype, str(t.device))
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
        self.tensors.append((name, data, st, align))
        return name


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
    with _gc_paused():
        skeleton = enc.value(state, "")
    # Largest elements first (by the real dtype, also for raw-stored ones), and
    # data starting 16-aligned: every tensor starts aligned to its element size.
    order = sorted(enc.tensors, key=lambda item: -item[3])
    entries: dict[str, Any] = {
        "__metadata__": {"format": "pt", SKELETON_KEY: json.dumps(skeleton, separators=(",", ":"), allow_nan=False)}
    }
    offset = 0
    for name, data, st, _ in order:
        size = data.numel() * data.element_size()
        entries[name] = {"dtype": st, "shape": list(data.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-(8 + len(header)) % 16)
    return EncodedState(header=struct.pack("<Q", len(header)) + header,
                        tensors=tuple(item[1] for item in order))


def decode(buffer: bytearray | memoryview, where: str = "<buffer>") -> Any:
    """Rebuild a state dict from a whole safetensors file held in ``buffer``.

    Tensors are views into ``buffer`` (no copy). A file without a distckpt
    skeleton (plain safetensors) decodes to ``{name: tensor}``. Raises
    :class:`IntegrityError` naming ``where`` when the bytes are not a valid file.
    """
    view = memoryview(buffer)
    if len(view) < 8:
        raise IntegrityError(f"{where}: too short to be a safetensors file")
    (hlen,) = struct.unpack("<Q", view[:8])
    if hlen > min(_HEADER_LIMIT, len(view) - 8):
        raise IntegrityError(f"{where}: header length {hlen} is out of bounds")
    try:
        with _gc_paused():
            return _decode(buffer, view, hlen)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise IntegrityError(f"{where}: malformed safetensors content ({exc})") from None


def _decode(buffer: bytearray | memoryview, view: memoryview, hlen: int) -> Any:
    header = json.loads(bytes(view[8:8 + hlen]).decode("utf-8"))
    meta = header.pop("__metadata__", None) or {}
    tensors = {name: _tensor_at(buffer, info, 8 + hlen, len(view)) for name, info in header.items()}
    skeleton = meta.get(SKELETON_KEY)
    if skeleton is None:
        return tensors
    return _Decoder(tensors).value(json.loads(skeleton))


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _tensor_at(buffer: bytearray | memoryview, info: dict[str, Any], start: int, end: int) -> torch.Tensor:
    dtype = _FROM_ST.get(info["dtype"])
    if dtype is None:
        raise IntegrityError(f"unsupported safetensors dtype {info['dtype']!r}")
    shape = [int(d) for d in info["shape"]]
    begin, stop = (int(x) for x in info["data_offsets"])
    numel = math.prod(shape)
    itemsize = _itemsize(dtype)
    if begin < 0 or stop < begin or start + stop > end or stop - begin != numel * itemsize:
        raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {shape} or the file")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=start + begin).reshape(shape)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its data is aligned to its element size (16 at most), else an aligned copy.

    Vectorised kernels may crash on misaligned data (a complex128 view at an
    8-byte boundary); files from other writers give no alignment guarantee.
    """
    if t.numel() and t.data_ptr() % min(t.element_size(), 16):
        return t.clone()
    return t


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self._raw: dict[str, torch.Tensor] = {}

    def value(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.value(v) for v in node]
        if not isinstance(node, dict) or not node:
            raise ValueError(f"unexpected skeleton node {node!r}")
        tag = next(iter(node))
        body = node[tag]
        if tag == "$tensor":
            return self.tensor(node)
        if tag == "$dict":
            return {k: self.value(v) for k, v in body}
        if tag == "$odict":
            out: OrderedDict[Any, Any] = OrderedDict((k, self.value(v)) for k, v in body)
            if "meta" in node:
                out._metadata = self.value(node["meta"])  # type: ignore[attr-defined]
            return out
        if tag == "$tuple":
            return tuple(self.value(v) for v in body)
        if tag == "$float":
            return struct.unpack(">d", bytes.fromhex(body))[0]
        if tag == "$bytes":
            return base64.b64decode(body, validate=True)
        if tag == "$ndarray":
            raw = self.tensors[body]
            dtype = np.dtype(node["dtype"])
            return np.frombuffer(bytes(tensor_bytes(raw)), dtype=dtype).reshape(node["shape"]).copy()
        if tag == "$npscalar":
            return np.frombuffer(base64.b64decode(body, validate=True), dtype=np.dtype(node["dtype"]))[0]
        if tag == "$dtype":
            return _dtype_from_name(body)
        if tag == "$size":
            return torch.Size(body)
        if tag == "$device":
            return torch.device(body)
        raise ValueError(f"unknown skeleton tag {tag!r}")

    def tensor(self, node: dict[str, Any]) -> torch.Tensor:
        name = node["$tensor"]
        if "dtype" not in node:
            if name not in self._raw:
                self._raw[name] = _aligned(self.tensors[name])
            return self._raw[name]
        if name not in self._raw:
            dtype = _dtype_from_name(node["dtype"])
            raw = self.tensors[name]
            shape = node["shape"]
            if raw.numel() == 0:
                self._raw[name] = torch.empty(shape, dtype=dtype)
            else:
                if raw.data_ptr() % min(_itemsize(dtype), 16):
                    raw = raw.clone()  # a fresh allocation is aligned; view it as the real dtype
                self._raw[name] = raw.view(dtype).reshape(shape)
        return self._raw[name]
