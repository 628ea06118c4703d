"""One file of a component's manifest entry, and the checks the manifest's fields share.

Pure (no I/O): :class:`FileEntry` and the field checks that
:mod:`distckpt.manifest` applies to components and to the whole manifest.
Called by :mod:`distckpt.manifest` when it parses or builds a manifest, and by
the save phases that build entries from a plan. Bad input raises
:class:`~distckpt.errors.ManifestError` naming where it was found.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any

from . import jsontext
from .errors import ManifestError
from .layout import check_relpath

__all__ = ["FILE_FIELDS", "FileEntry", "check_parts", "extra_fields", "need", "rank_list", "rank_lists"]

FILE_FIELDS = ("path", "ranks", "writer", "size_bytes", "checksum", "part")


def need(d: Mapping[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in d:
        raise ManifestError(f"{where}: missing field {name!r}")
    value = d[name]
    if isinstance(value, bool) and kind is int:
        raise ManifestError(f"{where}: field {name!r} must be an int, got a bool")
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: field {name!r} has type {type(value).__name__}")
    return value


def rank_list(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not (jsontext.plain_ints(value) or all(
            isinstance(r, int) and not isinstance(r, bool) for r in value)):
        raise ManifestError(f"{where}: expected a list of ranks, got {value!r}")
    return tuple(value)


def rank_lists(value: list[Any], where: str) -> tuple[tuple[int, ...], ...]:
    """A list of rank lists, checked at once (one by one only to name the bad one)."""
    if set(map(type, value)) <= {list} and jsontext.plain_int_lists(value):
        return tuple(map(tuple, value))
    return tuple(rank_list(s, where) for s in value)


def extra_fields(d: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in known}


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a component: relative path, replica-set members, writer, size, checksum.

    A balanced write stores one replica set's state as ``parts`` files, each
    written by another member; ``part`` is this file's index (0 carries the
    skeleton). JSON: ``"part": [index, count]``, present only when ``parts > 1``.
    Slots, not a ``__dict__``: a manifest of 65,536 ranks holds 75,000 entries.
    """

    path: str
    ranks: tuple[int, ...]
    writer: int
    size_bytes: int
    checksum: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    part: int = 0
    parts: int = 1

    def __post_init__(self) -> None:
        if self.parts < 1 or not 0 <= self.part < self.parts:
            raise ValueError(f"{self.path}: part {self.part} of {self.parts} is out of range")

    @classmethod
    def _many(cls, paths: Sequence[str], ranks: Sequence[tuple[int, ...]], writers: Sequence[int],
              sizes: Sequence[int], checksums: Sequence[str],
              parts: Sequence[tuple[int, int]] | None = None) -> tuple[FileEntry, ...]:
        """Entries of columns of values already checked (a parsed ``file_table``, a plan and its write
        records; ``parts``: ``(part, parts)`` per file, ``None`` when all are whole), without the
        dataclass ``__init__`` nor a Python frame per entry: C code (``map``) makes the objects and
        fills each slot a column at a time, for the 75,000 entries of 65,536 ranks. Called by
        :func:`distckpt.planning.build_manifest` and the manifest's ``file_table`` parser."""
        n = len(paths)
        indices: Iterator[int]
        counts: Iterator[int]
        if parts is None:
            indices, counts = repeat(0, n), repeat(1, n)
        else:
            indices, counts = map(itemgetter(0), parts), map(itemgetter(1), parts)
        columns: tuple[Iterable[Any], ...] = (paths, ranks, writers, sizes, checksums, map(dict, repeat((), n)), indices, counts)
        if not len(ranks) == len(writers) == len(sizes) == len(checksums) == len(parts or paths) == n:
            raise ValueError(f"FileEntry._many: columns of different lengths for {n} paths")
        entries = tuple(map(object.__new__, repeat(cls, n)))
        for fill, column in zip(_FILL, columns, strict=True):
            deque(map(fill, entries, column), maxlen=0)
        return entries

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "ranks": list(self.ranks), "writer": self.writer,
               "size_bytes": self.size_bytes, "checksum": self.checksum}
        if self.parts > 1:
            out["part"] = [self.part, self.parts]
        return {**out, **self.extra}

    def _row(self) -> jsontext.FileRow:
        """This entry for :class:`jsontext.FileRows` (its fields, and whether they are plain)."""
        plain = (not self.extra and type(self.writer) is int and type(self.size_bytes) is int
                 and type(self.path) is str and type(self.checksum) is str
                 and type(self.part) is int and type(self.parts) is int)
        return (self.path, self.ranks, self.writer, self.size_bytes, self.checksum,
                (self.part, self.parts) if self.parts > 1 else None, plain, self.to_dict)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> FileEntry:
        if type(d) is dict and len(d) == 5:  # the common entry, checked in one pass; else the full checks
            path, ranks, writer, size = d.get("path"), d.get("ranks"), d.get("writer"), d.get("size_bytes")
            checksum = d.get("checksum")
            if (type(path) is str and type(ranks) is list and type(writer) is int and type(size) is int
                    and size >= 0 and type(checksum) is str and jsontext.plain_ints(ranks)):
                try:
                    check_relpath(path)
                except ValueError as exc:
                    raise ManifestError(f"{where}: {exc}") from None
                return cls(path=path, ranks=tuple(ranks), writer=writer, size_bytes=size, checksum=checksum)
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        path = need(d, "path", str, where)
        try:
            check_relpath(path)
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        size = need(d, "size_bytes", int, where)
        if size < 0:
            raise ManifestError(f"{where}: negative size_bytes")
        part, parts = 0, 1
        if "part" in d:
            pair = rank_list(d["part"], where)
            if len(pair) != 2 or pair[1] < 2 or not 0 <= pair[0] < pair[1]:
                raise ManifestError(f"{where}: part must be [index, count] with 0 <= index < count, got {d['part']!r}")
            part, parts = pair
        return cls(path=path, ranks=rank_list(need(d, "ranks", list, where), where),
                   writer=need(d, "writer", int, where), size_bytes=size,
                   checksum=need(d, "checksum", str, where), extra=extra_fields(d, FILE_FIELDS),
                   part=part, parts=parts)




#: Each slot's setter, in field order (:meth:`FileEntry._many` fills them a column at a time)
_FILL = tuple(getattr(FileEntry, name).__set__ for name in
              ("path", "ranks", "writer", "size_bytes", "checksum", "extra", "part", "parts"))


def check_parts(files: tuple[FileEntry, ...], where: str) -> None:
    """Files of one replica set are one whole file or parts 0..n-1 of n, each once."""
    if all(f.parts == 1 for f in files) and len({f.ranks for f in files}) == len(files):
        return  # whole files, one per replica set
    by_set: dict[tuple[int, ...], list[FileEntry]] = {}
    for f in files:
        by_set.setdefault(f.ranks, []).append(f)
    for ranks, group in by_set.items():
        if sorted((f.part, f.parts) for f in group) != [(i, len(group)) for i in range(len(group))]:
            labels = [f"{f.part}/{f.parts}" for f in group]
            raise ManifestError(
                f"{where}: replica set {list(ranks)} has files {[f.path for f in group]} with parts {labels}; "
                "expected one file, or parts 0..n-1 of n"
            )
