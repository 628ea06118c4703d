"""Parsing a safetensors header into columns: where each tensor's bytes lie in the file.

Pure: parses bytes in memory. Called by the load path (:mod:`distckpt.reading`;
:mod:`distckpt.statecheck` reads a :class:`FileLayout`) and by
:func:`.decoder.decode`. Every byte range is checked against its
dtype, shape and the file size before anything is allocated; a malformed or
hostile header raises :class:`IntegrityError` naming the file, never
recursing or allocating without bound (:mod:`distckpt.boundedjson`).
"""

from __future__ import annotations

import math
import operator
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .. import boundedjson
from .. import dtensor as _dtensor
from ..errors import IntegrityError
from .dtypes import (
    _FROM_ST,
    _HEADER_DEPTH,
    _HEADER_LIMIT,
    PART_KEY,
    SKELETON_DEPTH,
    SKELETON_KEY,
    _itemsize,
    gc_paused,
)
from .headerscan import scan_compact


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
    #: whether the skeleton may hold a DTensor node (its text has a ``"$dtensor"`` string);
    #: ``False`` means surely none, so the load path skips its DTensor walks
    dtensors: bool = True

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
    limit = file_size - start
    compact = scan_compact(text, start, limit)  # the common form, without a JSON object per tensor
    if compact is not None:
        meta, (names, dtypes, shapes, begins, ends) = compact
    else:
        raw = boundedjson.loads(text, _HEADER_DEPTH)
        if not isinstance(raw, dict):
            raise ValueError("header is not a JSON object")
        meta = raw.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise ValueError("__metadata__ is not a JSON object")
        names, dtypes, shapes, begins, ends = _checked_columns(raw, start, limit)
        del raw
    text_skeleton = meta.get(SKELETON_KEY)
    if text_skeleton is not None and type(text_skeleton) is not str:
        raise ValueError("the skeleton is not a string")
    skeleton = None if text_skeleton is None else boundedjson.loads(text_skeleton, SKELETON_DEPTH)
    part = meta.get(PART_KEY)
    if part is not None and type(part) is not str:
        raise ValueError("the part label is not a string")
    if any(map(operator.gt, begins[:-1], begins[1:])):  # not in file order yet: sort the columns
        order = sorted(range(len(begins)), key=begins.__getitem__)
        names, dtypes, shapes = [names[i] for i in order], [dtypes[i] for i in order], [shapes[i] for i in order]
        begins, ends = [begins[i] for i in order], [ends[i] for i in order]
    return FileLayout(data_start=start, names=tuple(names), dtypes=tuple(dtypes), shapes=tuple(shapes),
                      begins=tuple(begins), ends=tuple(ends), skeleton=skeleton, part=part,
                      dtensors=text_skeleton is not None and _DTENSOR_MARK in text_skeleton)


_Columns = tuple[list[str], list[torch.dtype], list[tuple[int, ...]], list[int], list[int]]
_DTENSOR_MARK = '"' + _dtensor.TAG + '"'


def _checked_columns(raw: dict[str, Any], start: int, limit: int) -> _Columns:
    """The header's columns, entry by entry; raises :class:`IntegrityError` naming the first bad entry.

    A dtype and shape seen before are not checked again (thousands of tensors share a few).
    """
    names: list[str] = []
    dtypes: list[torch.dtype] = []
    shapes: list[tuple[int, ...]] = []
    begins: list[int] = []
    ends: list[int] = []
    kinds: dict[tuple[Any, Any], tuple[torch.dtype, tuple[int, ...], int]] = {}
    for name, info in raw.items():
        st = info["dtype"]
        dims = info["shape"]
        key = (st, tuple(dims) if type(dims) is list else None)
        try:
            kind = kinds.get(key)
        except TypeError:  # unhashable: refused by _kind below
            kind = None
        if kind is None:
            kind = kinds[key] = _kind(st, dims)
        offsets = info["data_offsets"]
        if type(offsets) is not list or len(offsets) != 2:
            raise IntegrityError(f"data_offsets must be [begin, end], got {offsets!r}"[:200])
        begin, stop = offsets
        if type(begin) is not int or type(stop) is not int or not 0 <= begin <= stop <= limit:
            if not all(type(x) is int and 0 <= x < 2**63 for x in offsets):
                raise IntegrityError(f"data offset must be an integer in [0, 2**63), got {offsets!r}"[:200])
            raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {dims} or the file")
        if stop - begin != kind[2]:
            raise IntegrityError(f"tensor bounds {begin}..{stop} do not fit its shape {dims} or the file")
        names.append(name)
        dtypes.append(kind[0])
        shapes.append(kind[1])
        begins.append(start + begin)
        ends.append(start + stop)
    return names, dtypes, shapes, begins, ends


def _kind(st: Any, dims: Any) -> tuple[torch.dtype, tuple[int, ...], int]:
    """An entry's dtype, shape and size in bytes; :class:`IntegrityError` when either is malformed."""
    dtype = _FROM_ST.get(st) if type(st) is str else None
    if dtype is None:
        raise IntegrityError(f"unsupported safetensors dtype {st!r}"[:200])
    if type(dims) is not list:
        raise IntegrityError(f"shape must be a list, got {dims!r}"[:200])
    for d in dims:
        if type(d) is not int or not 0 <= d < 2**63:
            raise IntegrityError(f"shape entry must be an integer in [0, 2**63), got {d!r}"[:200])
    return dtype, tuple(dims), math.prod(dims) * _itemsize(dtype)
