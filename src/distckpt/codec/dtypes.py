"""What the codec's modules share: the format's keys and limits, dtype names, tensor bytes.

Pure: no I/O, no collectives. Callers: the sibling modules :mod:`.encoded`,
:mod:`.encoder`, :mod:`.header`, :mod:`.decoder` and :mod:`.targets`; through
the package :mod:`distckpt.codec`, :mod:`distckpt.loading`,
:mod:`distckpt.digests` and :mod:`distckpt.comparison` (:func:`tensor_bytes`)
and :mod:`distckpt.reading` (:func:`gc_paused`). Malformed names and counts raise
:class:`IntegrityError`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import IntegrityError
from ..gcpause import gc_paused as gc_paused  # re-exported: the codec's callers take it from here

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


#: Largest address span :func:`writable_views` covers with one view (beyond it: a view per tensor).
_SPAN_LIMIT = 1 << 46


class _Memory:
    """``size`` bytes at address ``start``, as NumPy's array interface describes them (no copy, no owner)."""

    __slots__ = ("__array_interface__",)

    def __init__(self, start: int, size: int) -> None:
        self.__array_interface__ = {"data": (start, False), "shape": (size,), "typestr": "|u1", "version": 3}


def _memory(start: int, size: int) -> memoryview:
    array: Any = np.asarray(_Memory(start, size))
    return memoryview(array)


def span_views(starts: Sequence[int], sizes: Sequence[int]) -> list[memoryview]:
    """Writable views of the memory at ``starts[k]``, ``sizes[k]`` bytes long, without copying.

    Called by :func:`.targets.in_place` for the live tensors a load reads into,
    thousands at a time, with each tensor's ``data_ptr()`` and size in bytes
    (it has checked every one: plain, strided, contiguous, non-empty, on the CPU;
    anything else here is a bug). :func:`tensor_bytes` builds a NumPy array per
    tensor; here every view is a slice of one view spanning the addresses (a few
    hundred nanoseconds each). The span is only a range of addresses: nothing
    outside the given ranges is read or written through it. The views do not keep
    the tensors alive: the caller must.
    """
    if not starts:
        return []
    low = min(starts)
    high = max(map(operator.add, starts, sizes))
    if high - low > _SPAN_LIMIT:  # spread over the address space: one view each
        return [_memory(p, n) for p, n in zip(starts, sizes, strict=True)]
    span = _memory(low, high - low)
    return [span[p - low:p - low + n] for p, n in zip(starts, sizes, strict=True)]


@functools.cache
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
