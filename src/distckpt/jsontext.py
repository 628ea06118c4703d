"""The manifest's JSON text: indented objects, lists of plain values on one line, and fast paths.

Pure module, no I/O. Called by :mod:`distckpt.manifest` only (writing and
parsing ``manifest.json``). The layout is part of the on-disk format (a
golden checkpoint is compared byte for byte), so the fast paths here produce
exactly what the generic walk (:func:`dumps`) produces for the same value:

- :class:`FileRows`: a component's ``files`` list, one row per file, written
  with one string template per file instead of a dict and an encoder call per
  field (a manifest of 65,536 ranks lists about 75,000 files). A row whose
  values are not plain (``extra`` fields, an ``int`` subclass) is written by
  the generic walk.
- :func:`unique_object`: the ``object_pairs_hook`` that refuses duplicate keys
  with one C-level ``dict`` build per object, looking for the duplicate only
  when there is one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["FileRow", "FileRows", "dumps", "no_constants", "plain_ints", "unique_object"]

#: One encoder for every scalar and flat list (``json.dumps`` with options builds one per call).
_FLAT = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))
_STRING: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.encode_basestring_ascii

#: path, ranks, writer, size_bytes, checksum, (part, parts) or None, whether the other fields are
#: plain (str, exact int, no extra fields), and the file's dict (``FileEntry.to_dict``) for the generic walk.
FileRow = tuple[str, Sequence[Any], int, int, str, "tuple[int, int] | None", bool, Callable[[], Mapping[str, Any]]]


@dataclass(frozen=True)
class FileRows:
    """A ``files`` list to write with the fast path of :func:`dumps` (see the module docstring)."""

    rows: Sequence[FileRow]


def plain_ints(values: Sequence[Any]) -> bool:
    """Whether every value is exactly an ``int`` (not a bool or another subclass); C-speed."""
    return not values or set(map(type, values)) == {int}


_SCALARS = frozenset({int, str, float, bool, type(None)})


def _rank_texts(rows: Sequence[FileRow]) -> list[str] | None:
    """Every row's rank list as JSON, from one C-level encode of all of them, or ``None``.

    Exact when every rank is a number, bool or null (no string, list or object:
    one ``[`` per row, no quote, no brace), as the generic walk then writes each
    list the same way; otherwise ``None`` and the rows take the generic walk.
    """
    text = _FLAT.encode([r[1] for r in rows])
    if text.count("[") != len(rows) + 1 or '"' in text or "{" in text:
        return None
    return ["[" + p + "]" for p in text[2:-2].split("], [")]


def _file_rows(rows: Sequence[FileRow], level: int) -> str:
    if not rows:
        return "[]"
    pad = "  " * (level + 1)
    inner = "  " * (level + 2)
    ranks_json = _rank_texts(rows)
    items = []
    for i, (path, _, writer, size, checksum, part, plain, as_dict) in enumerate(rows):
        if not plain or ranks_json is None:
            items.append(pad + dumps(dict(as_dict()), level + 1))
            continue
        text = (f'{pad}{{\n{inner}"path": {_STRING(path)},\n{inner}"ranks": {ranks_json[i]},\n'
                f'{inner}"writer": {writer},\n{inner}"size_bytes": {size},\n{inner}"checksum": {_STRING(checksum)}')
        if part is not None:
            text += f',\n{inner}"part": [{part[0]}, {part[1]}]'
        items.append(text + "\n" + pad + "}")
    return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"


def dumps(value: Any, level: int = 0) -> str:
    """Indented JSON of ``value`` (two spaces a level) in which lists of plain values, and lists
    of such lists, stay on one line; :class:`FileRows` take the fast path."""
    if isinstance(value, FileRows):
        return _file_rows(value.rows, level)
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{_FLAT.encode(k)}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if type(value) is list:  # lists of plain values, or of such lists: one C-level encode
        kinds = set(map(type, value))
        if kinds <= _SCALARS or (kinds == {list} and all(set(map(type, v)) <= _SCALARS for v in value)):
            return _FLAT.encode(value)
    if isinstance(value, list) and any(isinstance(v, (dict, list)) and v for v in value):
        if all(isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v) for v in value):
            return _FLAT.encode(value)
        items = [pad + dumps(v, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return _FLAT.encode(value)


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object, or ``ValueError`` naming a key that occurs twice."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def no_constants(name: str) -> Any:
    """``parse_constant``: refuse ``NaN``, ``Infinity`` and ``-Infinity``."""
    raise ValueError(f"non-standard JSON constant {name}")
