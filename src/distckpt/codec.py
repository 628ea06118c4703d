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
import operator
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
#: dtype -> (safetensors name, element size, complex?) for the encoder's fast path
_FAST_DTYPES: dict[torch.dtype, tuple[str, int, bool]] = {
    dt: (st, torch.empty(0, dtype=dt).element_size(), dt.is_complex) for dt, st in _TO_ST.items()}
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
        array: Any = t.detach().numpy()  # the common case, several times cheaper than the general one
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


#: Tensors smaller than this are packed into runs when written (see :meth:`EncodedState.runs`).
PACK_BELOW = 1024 * 1024
#: Largest packed run: a few MiB, copied, hashed and written while still in cache.
RUN_BYTES = 4 * 1024 * 1024
_PACKABLE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                       torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128})


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
    #: bytes of each tensor (computed when not given)
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes:
            object.__setattr__(self, "sizes", tuple(t.numel() * t.element_size() for t in self.tensors))
        elif len(self.sizes) != len(self.tensors):
            raise ValueError(f"sizes: {len(self.sizes)} for {len(self.tensors)} tensors")

    @property
    def total_size(self) -> int:
        """Exact size in bytes of the file these chunks make."""
        return len(self.header) + sum(self.sizes)

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes, header first, without copying tensor data."""
        yield memoryview(self.header)
        for t, size in zip(self.tensors, self.sizes, strict=True):
            if size:
                yield tensor_bytes(t)

    def runs(self) -> Iterator[tuple[memoryview, bool] | tuple[list[torch.Tensor], int]]:
        """The file's bytes for :func:`distckpt.storage.write_runs`, in order.

        ``(view, True)``: a private copy nothing else changes (the header, a
        private encoding's snapshots); ``(view, False)``: a large tensor's bytes,
        which the writer copies before hashing; ``(tensors, nbytes)``: a run of
        small tensors of one dtype, at most :data:`RUN_BYTES` together, which the
        writer copies back to back with one call (one copy, hash and write per
        run instead of per tensor).
        """
        yield memoryview(self.header), True
        if self.private:
            for t, size in zip(self.tensors, self.sizes, strict=True):
                if size:
                    yield tensor_bytes(t), True
            return
        run: list[torch.Tensor] = []
        run_bytes = 0
        run_dtype: torch.dtype | None = None
        for t, size in zip(self.tensors, self.sizes, strict=True):
            if not size:
                continue
            if size >= PACK_BELOW or t.dtype not in _PACKABLE:
                if run:
                    yield run, run_bytes
                    run, run_bytes = [], 0
                yield tensor_bytes(t), False
                continue
            if run and (t.dtype is not run_dtype or run_bytes + size > RUN_BYTES):
                yield run, run_bytes
                run, run_bytes = [], 0
            run.append(t)
            run_bytes += size
            run_dtype = t.dtype
        if run:
            yield run, run_bytes

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
        sizes = self.sizes
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
            part_sizes = [self.sizes[i] for i in members]
            out.append(EncodedState(header=_header(meta, names, dtypes, tensors, part_sizes), tensors=tuple(tensors),
                                    names=tuple(names), dtypes=tuple(dtypes),
                                    skeleton=self.skeleton if index == 0 else "", private=self.private,
                                    sizes=tuple(part_sizes)))
        return tuple(out)


def _header(meta: dict[str, str], names: Sequence[str], dtypes: Sequence[str], tensors: Sequence[torch.Tensor],
            sizes: Sequence[int] | None = None) -> bytes:
    """Length prefix plus JSON header, padded so that tensor data starts 16-aligned.

    The text is exactly ``json.dumps({"__metadata__": meta, name: {"dtype", "shape",
    "data_offsets"}, ...}, separators=(",", ":"))``, built without a dict per tensor
    (names are ``t<k>``, dtypes safetensors names: nothing to escape).
    """
    pieces = ['{"__metadata__":', json.dumps(meta, separators=(",", ":"))]
    append = pieces.append
    offset = 0
    if sizes is None:
        sizes = [t.numel() * t.element_size() for t in tensors]
    for name, st, data, size in zip(names, dtypes, tensors, sizes, strict=True):
        shape = data.shape
        dims = str(shape[0]) if len(shape) == 1 else ",".join(map(str, shape))
        end = offset + size
        append(f',"{name}":{{"dtype":"{st}","shape":[{dims}],"data_offsets":[{offset},{end}]}}')
        offset = end
    append("}")
    header = "".join(pieces).encode("utf-8")
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
        self._by_ptr: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}

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

    def fast(self, obj: Any) -> Any:
        """:meth:`value` without building paths (they only serve error messages): the common
        containers, leaves and plain CPU tensors inline, anything else through :meth:`value`.
        A :class:`SerializationError` here means: encode again with :meth:`value` for its path."""
        kind = type(obj)
        if kind is dict:
            items = [[k, self.fast(v)] for k, v in obj.items()]
            for k in obj:
                if type(k) is not str and type(k) is not int:
                    raise SerializationError("bad key")
            return {"$dict": items}
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            # A plain contiguous CPU tensor of a dtype safetensors has (never quantized), not a
            # lazily conjugated or negated view, seen for the first time: referenced as is.
            fast = _FAST_DTYPES.get(obj.dtype)
            if (fast is not None and obj.is_cpu and obj.layout is torch.strided and obj.is_contiguous()
                    and obj.numel() > 0 and not obj.is_neg() and not (fast[2] and obj.is_conj())):
                ptr = obj.data_ptr()
                if ptr not in self._by_ptr:
                    tensors = self.tensors
                    name = f"t{len(tensors)}"
                    tensors.append((name, obj, fast[0], fast[1]))
                    leaf: dict[str, Any] = {"$tensor": name}
                    self._by_ptr[ptr] = (obj, leaf)
                    return leaf
            return self.tensor(obj, "")
        if obj is None or kind is str or kind is int or kind is bool or (kind is float and math.isfinite(obj)):
            return obj
        if kind is list:
            return [self.fast(v) for v in obj]
        if kind is tuple:
            return {"$tuple": [self.fast(v) for v in obj]}
        if kind is OrderedDict:
            node: dict[str, Any] = {"$odict": [[k, self.fast(v)] for k, v in obj.items()]}
            for k in obj:
                if type(k) is not str and type(k) is not int:
                    raise SerializationError("bad key")
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                node["meta"] = self.fast(meta)
            return node
        return self.value(obj, "")

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
    with gc_paused():  # one pause; the temporaries below are freed before it ends
        try:
            if enc.copy:
                skeleton = enc.value(state, "")
            else:
                try:
                    skeleton = enc.fast(state)
                except SerializationError:  # again, slowly, for the message naming the path
                    enc = _Encoder()
                    skeleton = enc.value(state, "")
            text = json.dumps(skeleton, separators=(",", ":"), allow_nan=False)
        except RecursionError:
            raise SerializationError(_TOO_DEEP) from None
        del skeleton
        if boundedjson.nesting_depth(text) > SKELETON_DEPTH:
            raise SerializationError(_TOO_DEEP)
        # Largest elements first (by the real dtype, also for raw-stored ones), and
        # data starting 16-aligned: every tensor starts aligned to its element size.
        # (A stable sort: equal sizes keep their traversal order.)
        order = enc.tensors
        if any(item[3] != order[0][3] for item in order):
            order = sorted(order, key=operator.itemgetter(3), reverse=True)
        names = tuple([item[0] for item in order])
        dtypes = tuple([item[2] for item in order])
        tensors = tuple([item[1] for item in order])
        sizes = tuple([t.numel() * t.element_size() for t in tensors])
        del order, enc
        header = _header({"format": "pt", SKELETON_KEY: text}, names, dtypes, tensors, sizes)
    return EncodedState(header=header, tensors=tensors, names=names, dtypes=dtypes,
                        skeleton=text, private=copy or reuse is not None, sizes=sizes)


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
    """A parsed safetensors header: where the data starts, the tensors in file order (as
    columns: ``names``, ``dtypes``, ``shapes``, absolute ``begins`` and ``ends``), the
    distckpt skeleton (``None`` for a plain safetensors file) and the part label."""

    data_start: int
    names: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[tuple[int, ...], ...]
    begins: tuple[int, ...]
    ends: tuple[int, ...]
    skeleton: Any
    part: str | None = None

    def __post_init__(self) -> None:
        count = len(self.names)
        if not len(self.dtypes) == len(self.shapes) == len(self.begins) == len(self.ends) == count:
            raise ValueError("FileLayout: its columns differ in length")

    @property
    def entries(self) -> tuple[TensorEntry, ...]:
        """The tensors in file order, one :class:`TensorEntry` each (built on demand)."""
        return tuple(map(TensorEntry, self.names, self.dtypes, self.shapes, self.begins, self.ends))


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
    size; raises :class:`IntegrityError` naming ``where`` otherwise. Builds
    columns, not an object per tensor, and frees the parsed JSON before it
    returns (with the collector paused: nothing left for it to walk later).
    """
    start = header_length(header, file_size, where)
    try:
        with gc_paused():
            layout = _parse_entries(bytes(header[8:start]).decode("utf-8"), start, file_size)
    except IntegrityError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RuntimeError) as exc:
        raise IntegrityError(f"{where}: malformed safetensors header ({exc})"[:400]) from None
    return layout


def _parse_entries(text: str, start: int, file_size: int) -> FileLayout:
    raw = boundedjson.loads(text, _HEADER_DEPTH)
    if not isinstance(raw, dict):
        raise ValueError("header is not a JSON object")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not a JSON object")
    names: list[str] = []
    dtypes: list[torch.dtype] = []
    shapes: list[tuple[int, ...]] = []
    begins: list[int] = []
    ends: list[int] = []
    limit = file_size - start
    for name, info in raw.items():
        st = info["dtype"]
        dtype = _FROM_ST.get(st) if type(st) is str else None
        if dtype is None:
            raise IntegrityError(f"unsupported safetensors dtype {st!r}"[:200])
        dims = info["shape"]
        if type(dims) is not list:
            raise IntegrityError(f"shape must be a list, got {dims!r}"[:200])
        for d in dims:
            if type(d) is not int or not 0 <= d < 2**63:
                raise IntegrityError(f"shape entry must be an integer in [0, 2**63), got {d!r}"[:200])
        offsets = info["data_offsets"]
        if type(offsets) is not list or len(offsets) != 2:
            raise IntegrityError(f"data_offsets must be [begin, end], got {offsets!r}"[:200])
        begin, stop = offsets
        if type(begin) is not int or type(stop) is not int or not 0 <= begin <= stop <= limit:
            if not all(type(x) is int and 0 <= x < 2**63 for x in offsets):
                raise IntegrityError(f"data offset must be an integer in [0, 2**63), got {offsets!r}"[:200])
            raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {dims} or the file")
        if stop - begin != math.prod(dims) * _itemsize(dtype):
            raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {dims} or the file")
        names.append(name)
        dtypes.append(dtype)
        shapes.append(tuple(dims))
        begins.append(start + begin)
        ends.append(start + stop)
    del raw
    text_skeleton = meta.get(SKELETON_KEY)
    if text_skeleton is not None and type(text_skeleton) is not str:
        raise ValueError("the skeleton is not a string")
    skeleton = None if text_skeleton is None else boundedjson.loads(text_skeleton, SKELETON_DEPTH)
    part = meta.get(PART_KEY)
    if part is not None and type(part) is not str:
        raise ValueError("the part label is not a string")
    if any(b > a for a, b in zip(begins[1:], begins[:-1], strict=True)):  # not in file order yet: sort the columns
        order = sorted(range(len(begins)), key=begins.__getitem__)
        names, dtypes, shapes = [names[i] for i in order], [dtypes[i] for i in order], [shapes[i] for i in order]
        begins, ends = [begins[i] for i in order], [ends[i] for i in order]
    return FileLayout(data_start=start, names=tuple(names), dtypes=tuple(dtypes), shapes=tuple(shapes),
                      begins=tuple(begins), ends=tuple(ends), skeleton=skeleton, part=part)


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


_MISSING = object()


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
                for pair in body:
                    if type(pair) is not list or len(pair) != 2 or (type(pair[0]) is not str and type(pair[0]) is not int):
                        raise ValueError(f"a dict entry must be [str or int key, value], got {pair!r}"[:200])
                    v = pair[1]
                    if v is None or type(v) in _ATOMS:
                        out_dict[pair[0]] = v
                    elif type(v) is dict and len(v) == 1 and type(v.get("$tensor")) is str:
                        out_dict[pair[0]] = self.tensors[v["$tensor"]]  # a natively stored tensor, inline
                    else:
                        out_dict[pair[0]] = self.value(v)
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
            return [self.value(v) for v in node]
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
