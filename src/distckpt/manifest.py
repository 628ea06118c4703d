"""Manifest: the JSON record that makes a checkpoint committed.

The manifest lists every file of every component with the exact ranks it
belongs to, its writer, its size and its checksum. Parsing is strict (UTF-8,
no duplicate keys, bounded size, known major version) and raises
:class:`ManifestError` naming the source. Fields this version does not know,
written by a newer minor version, are kept in ``extra`` and written back.

Pure: the schema and its JSON, no I/O. :meth:`CheckpointManifest.load` and
:meth:`CheckpointManifest.save` reach the disk through the two functions
:mod:`distckpt.storage` binds here when it is imported (:func:`bind_files`;
importing ``distckpt`` imports it), so this module imports nothing that
touches the file system. Called by the save phases (building and writing the
manifest), the load phases and the series (reading it), and the CLI.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from . import boundedjson, jsontext
from .errors import ManifestError
from .fileentry import FileEntry, check_parts, extra_fields, need, rank_list, rank_lists
from .gcpause import gc_paused
from .patterns import BUILTIN_KINDS, KIND_PATTERN, SharingPattern, describe_record

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "CheckpointManifest",
    "ComponentManifest",
    "FileEntry",
    "bind_files",
]

FORMAT_NAME = "distckpt"
# 1.1: files may carry "part" (balanced writes); 1.2: components carry "pattern": {kind, params}
FORMAT_VERSION = "1.3"
#: 1.4: a component of many files may list them as a ``file_table`` of columns; a manifest that
#: does says 1.4, one that does not says FORMAT_VERSION (1.3 readers read it unchanged)
TABLE_VERSION = "1.4"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_DEPTH = 512  # JSON nesting levels (a manifest needs 6, plus what component metadata holds)

_COMPONENT_FIELDS = (
    "key", "sharing_pattern", "group_name", "ranks", "replicated_across", "required",
    "validation", "size_bytes", "checksum", "files", "metadata", "pattern", "file_table",
)
_TOP_FIELDS = (
    "format", "format_version", "checkpoint_id", "sequence", "world_size", "timestamp",
    "library_version", "pytorch_version", "topology", "components",
)


_EXTRA = attrgetter("extra")
#: a file's fields in :func:`jsontext.file_table`'s argument order
_TABLE_FIELDS = (attrgetter("path"), attrgetter("ranks"), attrgetter("writer"), attrgetter("size_bytes"),
                 attrgetter("checksum"), attrgetter("part", "parts"))

#: How :meth:`CheckpointManifest.load` and :meth:`~CheckpointManifest.save` reach the disk; set by
#: :func:`bind_files` (storage). read(path) -> (bytes, manifest file path); write(path, bytes).
_read_file: Callable[[str], tuple[bytes, str]] | None = None
_write_file: Callable[[str, bytes], None] | None = None


def bind_files(read: Callable[[str], tuple[bytes, str]], write: Callable[[str, bytes], None]) -> None:
    """Give manifests their file I/O. Called once, by :mod:`distckpt.storage` when it is imported.

    ``read(path)`` returns the bytes of the manifest of ``path`` (a checkpoint
    directory or a manifest file) and the file's path, raising
    :class:`ManifestError` naming it; ``write(path, data)`` writes manifest
    bytes atomically into ``path`` (a directory or a file path).
    """
    global _read_file, _write_file
    _read_file, _write_file = read, write


def _bound() -> tuple[Callable[[str], tuple[bytes, str]], Callable[[str, bytes], None]]:
    if _read_file is None or _write_file is None:
        raise RuntimeError("manifest file I/O is not bound: import distckpt (or distckpt.storage) first")
    return _read_file, _write_file


@dataclass(frozen=True)
class ComponentManifest:
    """What was saved for one component.

    ``sharing_pattern`` is the pattern's kind (a :class:`SharingPattern` alias for
    the built-ins, else the registered kind string) and ``params`` its parameters
    (JSON: ``"pattern": {"kind": ..., "params": {...}}``, format 1.2; derived from
    ``sharing_pattern`` and ``group_name`` for 1.0 and 1.1 manifests).
    ``group_name`` is the group of a one-group PER_GROUP, kept for 1.1 readers.
    ``ranks`` are the writers (sorted); ``replicated_across`` the replica sets,
    one per file (or per group of parts); ``validation`` the level used, or
    ``None`` when not validated; ``size_bytes`` the exact sum of the file sizes;
    ``checksum`` a digest of the files' checksums in order.
    """

    key: str
    sharing_pattern: SharingPattern | str
    group_name: str | None
    ranks: tuple[int, ...]
    replicated_across: tuple[tuple[int, ...], ...]
    files: tuple[FileEntry, ...]
    required: bool = True
    validation: str | None = None
    size_bytes: int = 0
    checksum: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        kind = self.kind
        if KIND_PATTERN.fullmatch(kind) is None:
            raise ValueError(f"component {self.key!r}: {kind!r} is not a pattern kind")
        if kind in BUILTIN_KINDS:
            object.__setattr__(self, "sharing_pattern", SharingPattern(kind))
        if self.params is None:  # 1.0 and 1.1 recorded the pattern as kind + group name
            params = {"groups": [self.group_name]} if self.group_name is not None else {}
            object.__setattr__(self, "params", params)

    @property
    def kind(self) -> str:
        """The pattern's registered kind."""
        return str(self.sharing_pattern.value if isinstance(self.sharing_pattern, SharingPattern)
                   else self.sharing_pattern)

    def describe_pattern(self) -> str:
        """``kind`` or ``kind(params)``, as the CLI and errors print it."""
        return describe_record(self.kind, self.params or {})

    def file_for_rank(self, rank: int, elastic: bool = False) -> FileEntry:
        """The (first) file whose replica set holds ``rank``; ``KeyError`` if none does."""
        return self.files_for_rank(rank, elastic)[0]

    def files_for_rank(self, rank: int, elastic: bool = False) -> tuple[FileEntry, ...]:
        """The files holding ``rank``'s state: one, or every part of a balanced write in
        part order. A rank in no saved set gets set 0 when the pattern is ``elastic``
        (it loads into another world size). ``KeyError`` if no file belongs to ``rank``."""
        found = [e for e in self.files if rank in e.ranks]
        if not found and elastic:
            found = list(self.files)
        if not found:
            raise KeyError(f"no file of component {self.key!r} belongs to rank {rank}")
        first = found[0].ranks
        return tuple(sorted((e for e in found if e.ranks == first), key=lambda e: e.part))

    def to_dict(self) -> dict[str, Any]:
        return self._fields([f.to_dict() for f in self.files])

    def _table(self) -> dict[str, jsontext.Encoded] | None:
        """The ``file_table`` (format 1.4) to write for this component's files, or ``None``
        (:func:`jsontext.file_table`: small components, or files with fields of a newer version)."""
        files = self.files
        if len(files) < jsontext.TABLE_MIN_FILES or any(map(_EXTRA, files)):
            return None
        paths, ranks, writers, sizes, checksums, parts = (list(map(get, files)) for get in _TABLE_FIELDS)  # C-level
        return jsontext.file_table(paths, ranks, writers, sizes, checksums, parts, self.replicated_across)

    def _fields(self, files: Any, files_key: str = "files") -> dict[str, Any]:
        """The JSON object, with ``files`` as given (dicts, :class:`jsontext.FileRows` to write, or a
        ``file_table`` under ``files_key``)."""
        return {
            "key": self.key,
            "sharing_pattern": self.kind,
            "group_name": self.group_name,
            "pattern": {"kind": self.kind, "params": dict(self.params or {})},
            "ranks": list(self.ranks),
            "replicated_across": list(map(list, self.replicated_across)),
            "required": self.required,
            "validation": self.validation,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            files_key: files,
            "metadata": dict(self.metadata),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ComponentManifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object")
        kind = need(d, "sharing_pattern", str, where)
        params: dict[str, Any] | None = None
        if "pattern" in d:
            record = need(d, "pattern", dict, where)
            if need(record, "kind", str, f"{where}.pattern") != kind:
                raise ManifestError(f"{where}: pattern.kind {record['kind']!r} differs from sharing_pattern {kind!r}")
            params = need(record, "params", dict, f"{where}.pattern")
        elif kind.lower() in BUILTIN_KINDS:
            kind = kind.lower()
        if KIND_PATTERN.fullmatch(kind) is None:
            raise ManifestError(f"{where}: sharing_pattern {kind!r} is not a pattern kind")
        sets = rank_lists(need(d, "replicated_across", list, where), where)
        if "file_table" in d:  # format 1.4: a large component's files as columns
            if "files" in d:
                raise ManifestError(f"{where}: both files and file_table; expected one of them")
            try:
                columns = jsontext.table_rows(d["file_table"], where, sets)
            except ValueError as exc:
                raise ManifestError(str(exc)) from None
            files = FileEntry._many(*columns)
            if columns[5] is not None or len(set(columns[1])) != len(files):  # else whole files, one per set
                check_parts(files, where)
        else:
            files_raw = need(d, "files", list, where)
            files = tuple(FileEntry.from_dict(f, f"{where}.files[{i}]") for i, f in enumerate(files_raw))
            check_parts(files, where)
        group = d.get("group_name")
        if group is not None and not isinstance(group, str):
            raise ManifestError(f"{where}: group_name must be a string or null")
        validation = d.get("validation")
        if validation is not None and not isinstance(validation, str):
            raise ManifestError(f"{where}: validation must be a string or null")
        metadata = d.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ManifestError(f"{where}: metadata must be an object")
        return cls(
            key=need(d, "key", str, where),
            sharing_pattern=kind,
            group_name=group,
            ranks=rank_list(need(d, "ranks", list, where), where),
            replicated_across=sets,
            files=files,
            required=bool(d.get("required", True)),
            validation=validation,
            size_bytes=need(d, "size_bytes", int, where),
            checksum=d.get("checksum"),
            metadata=metadata,
            extra=extra_fields(d, _COMPONENT_FIELDS),
            params=params,
        )


@dataclass(frozen=True)
class CheckpointManifest:
    """The committed record of one checkpoint.

    ``sequence`` orders checkpoints of one output directory: "latest" is the
    committed checkpoint with the highest sequence, never the newest mtime.
    ``topology`` is ``{"nodes": [[ranks]...], "groups": {name: [[ranks]...]}}``.
    """

    checkpoint_id: str
    world_size: int
    timestamp: str
    components: Mapping[str, ComponentManifest]
    topology: Mapping[str, Any]
    sequence: int = 0
    library_version: str = ""
    pytorch_version: str = ""
    format_version: str = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self._fields({k: c.to_dict() for k, c in self.components.items()})

    def _fields(self, components: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "checkpoint_id": self.checkpoint_id,
            "sequence": self.sequence,
            "world_size": self.world_size,
            "timestamp": self.timestamp,
            "library_version": self.library_version,
            "pytorch_version": self.pytorch_version,
            "topology": dict(self.topology),
            "components": components,
            **self.extra,
        }

    def to_json(self) -> str:
        """Indented JSON in which lists of plain values (rank lists) stay on one line.

        Raises :class:`ManifestError` when it would nest deeper than
        ``MAX_MANIFEST_DEPTH`` (deep component metadata): never write what cannot be read back.
        """
        with gc_paused():
            return self._to_json()

    def _to_json(self) -> str:
        rows = {}
        for k, c in self.components.items():
            table = c._table()
            rows[k] = (c._fields(jsontext.FileRows([f._row() for f in c.files])) if table is None
                       else c._fields(table, "file_table"))
        fields = self._fields(rows)
        if any("file_table" in c for c in rows.values()) and _version(self.format_version) < _version(TABLE_VERSION):
            fields["format_version"] = TABLE_VERSION
        text = jsontext.dumps(fields, 0) + "\n"
        if boundedjson.nesting_depth(text) > MAX_MANIFEST_DEPTH:
            raise ManifestError(f"checkpoint {self.checkpoint_id!r}: the manifest would nest deeper than "
                                f"{MAX_MANIFEST_DEPTH} levels (component metadata too deeply nested)")
        return text

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> CheckpointManifest:
        """Validate and build; raises :class:`ManifestError` naming ``where``."""
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: top level must be a JSON object")
        if d.get("format") != FORMAT_NAME:
            raise ManifestError(f"{where}: not a distckpt manifest (format={d.get('format')!r})")
        version = need(d, "format_version", str, where)
        major = version.split(".", 1)[0]
        if major != FORMAT_VERSION.split(".", 1)[0]:
            raise ManifestError(
                f"{where}: format version {version} is not readable by this library "
                f"(reads {FORMAT_VERSION.split('.')[0]}.x); upgrade distckpt"
            )
        comps_raw = need(d, "components", dict, where)
        components = {
            key: ComponentManifest.from_dict(c, f"{where}: components.{key}") for key, c in comps_raw.items()
        }
        for key, comp in components.items():
            if comp.key != key:
                raise ManifestError(f"{where}: component listed under {key!r} says its key is {comp.key!r}")
        topology = need(d, "topology", dict, where)
        world = need(d, "world_size", int, where)
        if world < 1:
            raise ManifestError(f"{where}: world_size must be positive")
        if "sequence" in d and not 0 <= need(d, "sequence", int, where) < 2**63:
            raise ManifestError(f"{where}: sequence must be in [0, 2**63), got {d['sequence']}"[:300])
        for key, comp in components.items():
            if comp.checksum is not None and not isinstance(comp.checksum, str):
                raise ManifestError(f"{where}: components.{key}: checksum must be a string or null")
        return cls(
            checkpoint_id=need(d, "checkpoint_id", str, where),
            world_size=world,
            timestamp=need(d, "timestamp", str, where),
            components=components,
            topology=topology,
            sequence=need(d, "sequence", int, where) if "sequence" in d else 0,
            library_version=str(d.get("library_version", "")),
            pytorch_version=str(d.get("pytorch_version", "")),
            format_version=version,
            extra=extra_fields(d, _TOP_FIELDS),
        )

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> CheckpointManifest:
        """Parse manifest bytes strictly; raises :class:`ManifestError` naming ``where``.

        The cyclic GC is paused meanwhile (:func:`~distckpt.codec.dtypes.gc_paused`): a manifest
        of 65,536 ranks builds about a million objects, none of them in a cycle, and the
        collections their allocation would trigger cost more than the parse.
        """
        with gc_paused():
            return cls._from_json(data, where)

    @classmethod
    def _from_json(cls, data: bytes, where: str) -> CheckpointManifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{where}: {len(data)} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            raw = boundedjson.loads(text, MAX_MANIFEST_DEPTH, object_pairs_hook=jsontext.unique_object,
                                    parse_constant=jsontext.no_constants)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        try:
            return cls.from_dict(raw, where)
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:  # any field a check missed
            raise ManifestError(f"{where}: malformed manifest ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically to ``path`` (a checkpoint directory or a file path), through storage."""
        _bound()[1](os.fspath(path), self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CheckpointManifest:
        """Read from a checkpoint directory or a manifest file, through storage;
        :class:`ManifestError` on any problem."""
        data, where = _bound()[0](os.fspath(path))
        return cls.from_json(data, where=where)


def _version(text: str) -> tuple[int, ...]:
    """``"1.3"`` -> ``(1, 3)``; a part that is not a number counts as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in text.split("."))
