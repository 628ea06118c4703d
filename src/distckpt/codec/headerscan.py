"""A safetensors header in its compact form, read without building a JSON object per tensor.

Pure: parses text in memory. Called by :func:`.header.parse_header` first, for
every header; it answers only for the compact form writers emit (distckpt's
own, and ``json.dumps(..., separators=(",", ":"))``): no whitespace inside, a
flat ``__metadata__`` object of strings first, then entries
``"name":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]}`` with names free
of escapes. It returns the metadata and the columns exactly as
``json.loads`` plus :func:`.header._checked_columns` would, or ``None`` for
anything else (other spacing, key order, escapes, a repeated name, a bad dtype,
shape or offset): the caller then parses the header in full, which names what is
wrong. Nothing here recurses, so no depth check is needed; the skeleton inside
the metadata is parsed by the caller, depth-checked. Never raises.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from itertools import accumulate
from json import decoder as _json_decoder
from typing import Any

import torch

from .dtypes import _FROM_ST, _itemsize

__all__ = ["scan_compact"]

#: the json module's own string scanner (C), strict as ``json.loads``; not in the type stubs
_scanstring: Callable[[str, int], tuple[str, int]] = _json_decoder.scanstring  # type: ignore[attr-defined]
_NUMBER = r"(?:0|[1-9][0-9]*)"
#: one entry: its name (no quote, backslash or control character); its kind, the text from the
#: dtype to the shape's last number (``F32","shape":[3,4``); its begin and end offsets
_ENTRY = re.compile(
    r',"([^"\\\x00-\x1f]*)":\{"dtype":"([A-Z0-9_]+","shape":\[(?:' + _NUMBER + r"(?:," + _NUMBER + r")*)?)\],"
    r'"data_offsets":\[(' + _NUMBER + r"),(" + _NUMBER + r")\]\}")
_GROUPS = 5  # what re.split gives per entry: the text before it, then its four groups
_OPEN = '{"__metadata__":{'
_KIND_SPLIT = '","shape":['
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_SIZE = operator.itemgetter(2)

_Columns = tuple[list[str], list[torch.dtype], list[tuple[int, ...]], list[int], list[int]]


def scan_compact(text: str, start: int, limit: int) -> tuple[dict[str, str], _Columns] | None:
    """``(metadata, (names, dtypes, shapes, begins, ends))`` of a compact header, or ``None``.

    ``text``: the JSON header; ``start``: where the data starts in the file (added to every
    offset); ``limit``: the bytes of data the file holds. Every check of the full parse is made:
    a known dtype, shape entries and offsets below 2**63, ``end <= limit`` and ``end - begin``
    the size of the entry's shape.
    """
    try:
        return _scan(text, start, limit)
    except (ValueError, KeyError, TypeError, OverflowError, IndexError):
        return None


def _scan(text: str, start: int, limit: int) -> tuple[dict[str, str], _Columns] | None:
    if not text.startswith(_OPEN):
        return None
    scanned = _flat_strings(text, len(_OPEN))
    if scanned is None:
        return None
    meta, pos = scanned
    close = len(text.rstrip(" \t\n\r")) - 1  # the closing brace of the header object
    if close < pos or text[close] != "}":
        return None
    parts = _ENTRY.split(text[pos:close])
    if any(parts[0::_GROUPS]):  # text between entries, or before the first: not compact
        return None
    names = parts[1::_GROUPS]
    if not names:
        return meta, ([], [], [], [], [])
    if len(set(names)) != len(names) or "__metadata__" in names:
        return None  # json.loads would keep the last of a repeated key, in the first one's place
    kind_texts = parts[2::_GROUPS]
    kinds = {}
    for kind in set(kind_texts):  # a few distinct dtypes and shapes
        st, _, dims_text = kind.partition(_KIND_SPLIT)
        dtype = _FROM_ST.get(st)
        dims = tuple(map(int, dims_text.split(","))) if dims_text else ()
        if dtype is None or any(d >= 2**63 for d in dims):
            return None
        kinds[kind] = (dtype, dims, math.prod(dims) * _itemsize(dtype))
    per_entry = list(map(kinds.__getitem__, kind_texts))
    sizes = list(map(_SIZE, per_entry))
    begin_texts, end_texts = parts[3::_GROUPS], parts[4::_GROUPS]
    if begin_texts[1:] == end_texts[:-1]:  # back to back, as distckpt writes: each begin the previous end
        first = int(begin_texts[0])
        if list(map(str, accumulate(sizes, initial=first)))[1:] != end_texts:
            return None  # an end that is not its begin plus the size of its shape
        offsets = list(accumulate(sizes, initial=start + first))
        begins, ends = offsets[:-1], offsets[1:]
    else:
        relative = list(map(int, begin_texts))
        stops = list(map(int, end_texts))
        if list(map(operator.sub, stops, relative)) != sizes:
            return None  # (sizes are never negative: equal sizes also mean begin <= end)
        begins, ends = list(map(start.__add__, relative)), list(map(start.__add__, stops))
    if max(ends) - start > limit:
        return None
    return meta, (names, list(map(_FIRST, per_entry)), list(map(_SECOND, per_entry)), begins, ends)


def _flat_strings(text: str, pos: int) -> tuple[dict[str, str], int] | None:
    """A JSON object of string values, from just after its ``{`` at ``pos``, written without
    whitespace: ``(the object, the index after its })``, or ``None``. Strings are decoded by
    the json module's own scanner (strict, as ``json.loads``); a repeated key keeps its last value."""
    out: dict[str, Any] = {}
    if text.startswith("}", pos):
        return out, pos + 1
    while text.startswith('"', pos):
        key, pos = _scanstring(text, pos + 1)
        if not text.startswith(':"', pos):
            return None
        out[key], pos = _scanstring(text, pos + 2)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("}", pos):
            return out, pos + 1
        else:
            return None
    return None
