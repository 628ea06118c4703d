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
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import boundedjson
from . import dtensor as _dtensor
from .errors import IntegrityError, SerializationError

__all__ = [
    "PART_KEY",
    "SKELETON_KEY",
    "EncodedState",
    "FileLayout",
    "TensorEntry",
    "assemble",
    "decode",
    "encode",
    "encode_leaf",
    "flat_bytes",
    "gc_paused",
    "header_length",
    "live_targets",
    "parse_header",
    "state_nbytes",
    "tensor_bytes",
]

SKELETON_KEY = "distckpt.skeleton"
PART_KEY = "distckpt.part"
_HEADER_LIMIT = 100 * 1024 * 1024
#: JSON nesting accepted in a safetensors header (distckpt's and plain ones need 3).
_HEADER_DEPTH = 16
#: JSON nesting accepted in a skeleton; :func:`encode` refuses deeper states (about 170 nested dicts).
SKELETON_DEPTH = 512

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
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
                           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any) -> torch.dtype:
    # vars(), not getattr(): a hostile name must not trigger torch's lazy submodule imports
    dtype = vars(torch).get(name) if type(name) is str else None
    if not isinstance(dtype, torch.dtype):
        raise IntegrityError(f"unknown torch dtype {name!r} in checkpoint")
    return dtype


def _count(value: Any, what: str) -> int:
    """A JSON integer in [0, 2**63) (not a bool, a float such as 1e999, or a string)."""
    if type(value) is not int or not 0 <= value < 2**63:
        raise IntegrityError(f"{what} must be an integer in [0, 2**63), got {value!r}"[:200])
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if type(value) is not list:
        raise IntegrityError(f"shape must be a list, got {value!r}"[:200])
    return tuple(_count(d, "shape entry") for d in value)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
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
    if t.dtype in _NUMPY_DTYPES and t.numel() > 1 and t.is_contiguous():
        array: Any = t.detach().reshape(-1).numpy()  # the common case, about 2x cheaper than the general one
    else:
        array = flat_bytes(t).numpy()
    return memoryview(array).cast("B")


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


@dataclass(frozen=True)
class EncodedState:
    """A state dict ready to stream: the safetensors header and the tensors in file order.

    ``names``, ``dtypes`` (safetensors names) and ``skeleton`` describe the
    tensors so that :meth:`split` can build self-contained part files.
    ``private``: the tensors are snapshots this encoding owns (``encode(copy=True)``),
    which nothing else changes, so a writer may hash and write them in place.
    """

    header: bytes
    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    skeleton: str = ""
    private: bool = False

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

    def split(self, parts: int) -> tuple[EncodedState, ...]:
        """The same state as ``parts`` self-contained safetensors files (balanced writes).

        Tensors keep their file order and go to the part their first byte falls
        in when the tensor bytes are cut into ``parts`` equal ranges; part 0
        also carries the skeleton. Deterministic: replicas that encode to the
        same header split identically. :func:`assemble` joins the parts again.
        """
        if parts < 1:
            raise ValueError(f"parts: expected a positive int, got {parts}")
        if parts == 1:
            return (self,)
        sizes = [t.numel() * t.element_size() for t in self.tensors]
        total = sum(sizes)
        groups: list[list[int]] = [[] for _ in range(parts)]
        before = 0
        for i, size in enumerate(sizes):
            groups[min(parts - 1, before * parts // total) if total else 0].append(i)
            before += size
        out = []
        for index, members in enumerate(groups):
            meta = {"format": "pt", PART_KEY: f"{index}/{parts}"}
            if index == 0:
                meta[SKELETON_KEY] = self.skeleton
            tensors = [self.tensors[i] for i in members]
            names = [self.names[i] for i in members]
            dtypes = [self.dtypes[i] for i in members]
            out.append(EncodedState(header=_header(meta, names, dtypes, tensors), tensors=tuple(tensors),
                                    names=tuple(names), dtypes=tuple(dtypes),
                                    skeleton=self.skeleton if index == 0 else "", private=self.private))
        return tuple(out)


def _header(meta: dict[str, str], names: list[str], dtypes: list[str], tensors: list[torch.Tensor]) -> bytes:
    """Length prefix plus JSON header, padded so that tensor data starts 16-aligned."""
    entries: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, st, data in zip(names, dtypes, tensors, strict=True):
        size = data.numel() * data.element_size()
        entries[name] = {"dtype": st, "shape": list(data.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-(8 + len(header)) % 16)
    return struct.pack("<Q", len(header)) + header


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
        kind = type(t)
        if ((kind is torch.Tensor or kind is torch.nn.Parameter) and not self.copy and t.is_cpu
                and t.layout is torch.strided and t.numel() > 0 and t.is_contiguous()
                and not (t.is_conj() or t.is_neg() or t.is_quantized)):
            # Fast path, the common case: a plain contiguous CPU tensor, referenced as is.
            key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
            seen = self._alias.get(key)
            if seen is not None:
                return dict(seen)
            st = _TO_ST.get(t.dtype)
            if st is not None:
                fast: dict[str, Any] = {"$tensor": self._add(t, st, _itemsize(t.dtype))}
                self._alias[key] = fast
                return dict(fast)
        if kind is not torch.Tensor and kind is not torch.nn.Parameter and _dtensor.is_dtensor(t):
            return _dtensor.encode(t, path, self.tensor)  # the local shard, plus its layout
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


def state_nbytes(state: Any) -> int:
    """Bytes of tensor data in a state dict (nested dicts, lists and tuples), without encoding it. Pure."""
    if isinstance(state, torch.Tensor):
        shard = _dtensor.local_or_self(state)  # a DTensor stores its shard only
        return shard.numel() * shard.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


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
    try:
        with gc_paused():
            skeleton = enc.value(state, "")
    except RecursionError:
        raise SerializationError(_TOO_DEEP) from None
    # Largest elements first (by the real dtype, also for raw-stored ones), and
    # data starting 16-aligned: every tensor starts aligned to its element size.
    order = sorted(enc.tensors, key=lambda item: -item[3])
    names = [item[0] for item in order]
    dtypes = [item[2] for item in order]
    tensors = [item[1] for item in order]
    with gc_paused():
        try:
            text = json.dumps(skeleton, separators=(",", ":"), allow_nan=False)
        except RecursionError:
            raise SerializationError(_TOO_DEEP) from None
        if boundedjson.nesting_depth(text) > SKELETON_DEPTH:
            raise SerializationError(_TOO_DEEP)
        header = _header({"format": "pt", SKELETON_KEY: text}, names, dtypes, tensors)
    return EncodedState(header=header, tensors=tuple(tensors), names=tuple(names), dtypes=tuple(dtypes),
                        skeleton=text, private=enc.copy)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: stored dtype, shape and absolute byte range."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class FileLayout:
    """A parsed safetensors header: where the data starts, the tensors in file order,
    the distckpt skeleton (``None`` for a plain safetensors file) and the part label."""

    data_start: int
    entries: tuple[TensorEntry, ...]
    skeleton: Any
    part: str | None = None


def header_length(prefix: bytes | memoryview, file_size: int, where: str = "<buffer>") -> int:
    """Bytes taken by the length prefix and JSON header, from a file's first 8 bytes.

    Raises :class:`IntegrityError` naming ``where`` when it cannot fit the file.
    """
    if len(prefix) < 8 or file_size < 8:
        raise IntegrityError(f"{where}: too short to be a safetensors file")
    (hlen,) = struct.unpack("<Q", bytes(prefix[:8]))
    if hlen > min(_HEADER_LIMIT, file_size - 8):
        raise IntegrityError(f"{where}: header length {hlen} is out of bounds")
    return 8 + int(hlen)


def parse_header(header: bytes | memoryview, file_size: int, where: str = "<buffer>") -> FileLayout:
    """Parse the length prefix and JSON header of a file of ``file_size`` bytes. Pure.

    Every tensor's byte range is checked against its dtype, shape and the file
    size; raises :class:`IntegrityError` naming ``where`` otherwise.
    """
    start = header_length(header, file_size, where)
    try:
        with gc_paused():
            raw = boundedjson.loads(bytes(header[8:start]).decode("utf-8"), _HEADER_DEPTH)
        if not isinstance(raw, dict):
            raise ValueError("header is not a JSON object")
        meta = raw.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not a JSON object")
        entries = []
        for name, info in raw.items():
            dtype = _FROM_ST.get(info["dtype"]) if type(info.get("dtype")) is str else None
            if dtype is None:
                raise IntegrityError(f"unsupported safetensors dtype {info.get('dtype')!r}"[:200])
            shape = _shape(info["shape"])
            offsets = info["data_offsets"]
            if type(offsets) is not list or len(offsets) != 2:
                raise IntegrityError(f"data_offsets must be [begin, end], got {offsets!r}"[:200])
            begin, stop = (_count(x, "data offset") for x in offsets)
            if stop < begin or start + stop > file_size or stop - begin != math.prod(shape) * _itemsize(dtype):
                raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {list(shape)} or the file")
            entries.append(TensorEntry(name, dtype, shape, start + begin, start + stop))
        text = meta.get(SKELETON_KEY)
        if text is not None and type(text) is not str:
            raise ValueError("the skeleton is not a string")
        with gc_paused():
            skeleton = None if text is None else boundedjson.loads(text, SKELETON_DEPTH)
        part = meta.get(PART_KEY)
        if part is not None and type(part) is not str:
            raise ValueError("the part label is not a string")
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RuntimeError) as exc:
        raise IntegrityError(f"{where}: malformed safetensors header ({exc})"[:400]) from None
    entries.sort(key=lambda e: e.begin)
    return FileLayout(data_start=start, entries=tuple(entries), skeleton=skeleton, part=part)


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
                for e in layout.entries:
                    if e.name in tensors:
                        raise IntegrityError(f"tensor {e.name!r} appears twice")
                    tensors[e.name] = overrides[e.name] if e.name in overrides else _tensor_at(buffer, e)
            skeleton = parts[0][0].skeleton
            if skeleton is None:
                return tensors
            return _Decoder(tensors).value(skeleton)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, OverflowError, IndexError, struct.error) as exc:
        raise IntegrityError(f"{where}: malformed safetensors content ({exc})"[:400]) from None


def live_targets(skeleton: Any, entries: Iterable[TensorEntry], live: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Tensors of ``live`` (a component's current state dict) that can receive ``entries`` in place.

    Walks ``skeleton`` (the file's, or part 0's for a balanced write) and
    ``live`` together; an entry qualifies when the live
    tensor at the same path is a plain, contiguous, non-empty CPU tensor of the
    same dtype and shape, and no other entry already targets its storage.
    Returns ``{entry name: (the live tensor whose bytes receive the entry, the
    tensor to use for that entry in :func:`assemble`)}``. Pure.
    """
    if skeleton is None:
        return {}
    by_name = {e.name: e for e in entries}
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    storages: set[int] = set()

    def visit(node: Any, obj: Any) -> None:
        if isinstance(node, list):
            if isinstance(obj, (list, tuple)) and len(obj) == len(node):
                for n, o in zip(node, obj, strict=True):
                    visit(n, o)
            return
        if not isinstance(node, dict) or not node:
            return
        tag = next(iter(node))
        if tag in ("$dict", "$odict") and isinstance(obj, dict) and isinstance(node[tag], list):
            for pair in node[tag]:  # malformed pairs are skipped here and refused by assemble()
                if isinstance(pair, list) and len(pair) == 2 and type(pair[0]) in (str, int) and pair[0] in obj:
                    visit(pair[1], obj[pair[0]])
        elif tag == "$tuple":
            visit(node[tag], obj)
        elif tag == _dtensor.TAG:
            visit(node[tag], _dtensor.live_local(node, obj))
        elif tag == "$tensor" and type(node[tag]) is str and isinstance(obj, torch.Tensor):
            target = _target(node, by_name.get(node[tag]), obj)
            if target is not None and node[tag] not in found:
                storage = obj.untyped_storage().data_ptr()
                if storage not in storages:
                    storages.add(storage)
                    found[node[tag]] = target

    visit(skeleton, live)
    return found


def _target(node: dict[str, Any], entry: TensorEntry | None,
            t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    kind = type(t)
    if entry is None or not (kind is torch.Tensor or kind is torch.nn.Parameter):
        return None
    if not t.is_cpu or t.layout is not torch.strided or t.is_quantized or t.is_conj() or t.is_neg():
        return None
    if t.numel() == 0 or not t.is_contiguous():
        return None
    if "dtype" not in node:  # stored natively: the same dtype and shape, hence the same bytes
        return (t, t) if t.dtype == entry.dtype and t.shape == entry.shape else None
    # A dtype safetensors lacks: a U8 entry of the tensor's bytes, the real dtype in the skeleton.
    if _dtype_name(t.dtype) != node["dtype"] or list(t.shape) != node.get("shape"):
        return None
    flat = flat_bytes(t)
    return (flat, flat) if flat.numel() == entry.end - entry.begin else None


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


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
        if tag == _dtensor.TAG:
            return _dtensor.decode(node, self.value)
        if tag == "$dict":
            return {k: self.value(v) for k, v in _pairs(body)}
        if tag == "$odict":
            out: OrderedDict[Any, Any] = OrderedDict((k, self.value(v)) for k, v in _pairs(body))
            if "meta" in node:
                out._metadata = self.value(node["meta"])  # type: ignore[attr-defined]
            return out
        if tag == "$tuple":
            if type(body) is not list:
                raise ValueError(f"a tuple body must be a list, got {type(body).__name__}")
            return tuple(self.value(v) for v in body)
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
            if name not in self._raw:
                self._raw[name] = _aligned(self.tensors[name])
            return self._raw[name]
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
