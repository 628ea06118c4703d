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
- :func:`file_table`, :func:`table_rows`: a large component's ``files`` as a
  ``file_table`` of columns (format 1.4): one list per field, each written
  and parsed by C code, instead of one JSON object per file.
- :func:`unique_object`: the ``object_pairs_hook`` that refuses duplicate keys
  with one C-level ``dict`` build per object, looking for the duplicate only
  when there is one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

from .layout import check_relpath

__all__ = ["TABLE_COLUMNS", "TABLE_MIN_FILES", "Encoded", "FileRow", "FileRows", "dumps", "file_table", "no_constants",
           "plain_int_lists", "plain_ints", "table_rows", "unique_object"]

#: One encoder for every scalar and flat list (``json.dumps`` with options builds one per call).
_FLAT = json.JSONEncoder(allow_nan=False, separators=(", ", ": "))
#: The same output for values that cannot hold a cycle (lists of scalars, lists of such lists, checked
#: first): no id() bookkeeping per list, for the 65,536 rank lists of the topology and the replica sets.
_ACYCLIC = json.JSONEncoder(allow_nan=False, separators=(", ", ": "), check_circular=False)
_STRING: Any = getattr(json.encoder, "c_encode_basestring_ascii", None) or json.encoder.encode_basestring_ascii

#: path, ranks, writer, size_bytes, checksum, (part, parts) or None, whether the other fields are
#: plain (str, exact int, no extra fields), and the file's dict (``FileEntry.to_dict``) for the generic walk.
FileRow = tuple[str, Sequence[Any], int, int, str, "tuple[int, int] | None", bool, Callable[[], Mapping[str, Any]]]


@dataclass(frozen=True)
class Encoded:
    """JSON text that :func:`dumps` writes as it is (a ``file_table`` column, encoded by C code)."""

    text: str


@dataclass(frozen=True)
class FileRows:
    """A ``files`` list to write with the fast path of :func:`dumps` (see the module docstring)."""

    rows: Sequence[FileRow]


def plain_ints(values: Sequence[Any]) -> bool:
    """Whether every value is exactly an ``int`` (not a bool or another subclass); C-speed."""
    return not values or set(map(type, values)) == {int}


def plain_int_lists(lists: Iterable[Iterable[Any]]) -> bool:
    """Whether every value of every list is exactly an ``int``; C-speed, no flattened copy."""
    return set(map(type, chain.from_iterable(lists))) <= {int}


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
    if isinstance(value, Encoded):
        return value.text
    pad = "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{pad}{_FLAT.encode(k)}: {dumps(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if type(value) is list:  # lists of plain values, or of such lists: one C-level encode
        kinds = set(map(type, value))
        if kinds <= _SCALARS or (kinds == {list} and set(map(type, chain.from_iterable(value))) <= _SCALARS):
            return _ACYCLIC.encode(value)
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


#: A component lists its files as a ``file_table`` (format 1.4) from this many files on; fewer stay
#: one object per file, byte for byte what 1.3 wrote.
TABLE_MIN_FILES = 1024
#: The columns of a ``file_table``, in order; ``part`` (``[index, count]`` per file) only when some file is a part.
TABLE_COLUMNS = ("path", "ranks", "writer", "size_bytes", "checksum", "part")


def file_table(paths: list[Any], ranks: list[Any], writers: list[Any], sizes: list[Any], checksums: list[Any],
               parts: list[tuple[int, int]], sets: Sequence[Any] = ()) -> dict[str, Encoded] | None:
    """A component's files as columns, each already JSON (one line, as :func:`dumps` writes flat lists),
    or ``None`` when they should stay one object each.

    ``None`` below :data:`TABLE_MIN_FILES` files, or when a value is not plain
    (a path or checksum that is not a ``str``, a writer, size or rank that is
    not exactly an ``int``): those are written by the generic walk, as before.
    The ``ranks`` column is left out when file ``i`` belongs to set ``i`` of
    ``sets`` (the component's ``replicated_across``), one file per set, as
    every pattern without balanced writes has it. Called by
    :meth:`distckpt.manifest.CheckpointManifest.to_json`.
    """
    if len(paths) < TABLE_MIN_FILES:
        return None
    if not (set(map(type, paths)) == {str} and set(map(type, checksums)) == {str} and plain_ints(writers)
            and plain_ints(sizes) and plain_int_lists(ranks)):
        return None
    columns = (("path", paths), ("ranks", ranks), ("writer", writers), ("size_bytes", sizes), ("checksum", checksums))
    same_sets = len(sets) == len(ranks) and list(map(tuple, ranks)) == list(map(tuple, sets))  # C-level compare
    table: dict[str, Encoded] = {name: Encoded(_ACYCLIC.encode(column)) for name, column in columns
                                 if not (name == "ranks" and same_sets)}  # tuples encode as arrays
    if set(map(itemgetter(1), parts)) - {1}:  # some file is a part
        table["part"] = Encoded(_ACYCLIC.encode(parts))
    return table


_PATHS = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,254}/[A-Za-z0-9][A-Za-z0-9._-]{0,254}\n)*")


def table_rows(table: Any, where: str, sets: Sequence[tuple[int, ...]]) -> tuple[
        list[str], list[tuple[int, ...]], list[int], list[int], list[str], list[tuple[int, int]] | None]:
    """The columns of a parsed ``file_table``, checked; ``ValueError`` naming ``where`` and the bad value.

    Checks what :meth:`distckpt.manifest.FileEntry.from_dict` checks of one
    file, a column at a time: safe relative paths, lists of exact ints, sizes
    not negative, string checksums, parts ``[index, count]`` in range, and
    every column as long as ``path``. A column this version does not know is refused.
    Without a ``ranks`` column, file ``i`` belongs to set ``i`` of ``sets``
    (``replicated_across``, parsed and checked: tuples of ints, shared with the
    entries as they are), which must then list one set per file.
    The parts are ``None`` without a ``part`` column (every file whole).
    """
    if type(table) is not dict:
        raise ValueError(f"{where}: file_table must be an object")
    unknown = sorted(set(table) - set(TABLE_COLUMNS))
    if unknown:
        raise ValueError(f"{where}: file_table has columns this version does not know: {unknown}")
    listed = "ranks" in table
    if not listed:
        if len(sets) != len(table.get("path") or ()):
            raise ValueError(f"{where}: file_table has no ranks column and replicated_across lists "
                             f"{len(sets)} sets, not one per file")
        table = {**table, "ranks": list(sets)}
    for name in TABLE_COLUMNS[:5]:
        if type(table.get(name)) is not list:
            raise ValueError(f"{where}: file_table.{name} must be a list")
    paths, ranks, writers, sizes, checksums = (table[n] for n in TABLE_COLUMNS[:5])
    n = len(paths)
    part = table.get("part")
    if part is not None and type(part) is not list:
        raise ValueError(f"{where}: file_table.part must be a list")
    for name, column in zip(TABLE_COLUMNS, (paths, ranks, writers, sizes, checksums, part), strict=True):
        if column is not None and len(column) != n:
            raise ValueError(f"{where}: file_table.{name} has {len(column)} values for {n} paths")
    if set(map(type, paths)) - {str}:
        raise ValueError(f"{where}: file_table.path must hold strings")
    joined = "\n".join(paths) + "\n" if paths else ""
    if joined.count("\n") != n or _PATHS.fullmatch(joined) is None:
        for i, path in enumerate(paths):
            try:
                check_relpath(path)
            except ValueError as exc:
                raise ValueError(f"{where}: file_table.path[{i}]: {exc}") from None
    if listed and (set(map(type, ranks)) - {list} or not plain_int_lists(ranks)):
        raise ValueError(f"{where}: file_table.ranks must hold lists of ranks (ints)")
    for name, column in (("writer", writers), ("size_bytes", sizes)):
        if not plain_ints(column):
            raise ValueError(f"{where}: file_table.{name} must hold ints")
    if sizes and min(sizes) < 0:
        raise ValueError(f"{where}: file_table.size_bytes[{sizes.index(min(sizes))}] is negative")
    if set(map(type, checksums)) - {str}:
        raise ValueError(f"{where}: file_table.checksum must hold strings")
    pairs = None
    if part is not None:
        if not all(type(p) is list and len(p) == 2 and plain_ints(p) and 0 <= p[0] < p[1] for p in part):
            raise ValueError(f"{where}: file_table.part must hold [index, count] pairs with 0 <= index < count")
        pairs = [(p[0], p[1]) for p in part]
    return paths, list(map(tuple, ranks)) if listed else ranks, writers, sizes, checksums, pairs
