"""The ``distckpt`` command line: look at, check, compare and convert checkpoints.

Subcommands (every one reads only; ``convert`` writes a new checkpoint and
never touches its source)::

    distckpt ls OUTPUT_DIR                 checkpoints oldest to newest, latest marked
    distckpt inspect CHECKPOINT [--json]   components, patterns, writers, files, topology
    distckpt verify CHECKPOINT             every size and checksum against the manifest
    distckpt diff A B                      components, entries and tensors that differ
    distckpt convert SRC DST               original-format checkpoint -> distckpt format
    distckpt convert --to-torch FILE --rank R CHECKPOINT
                                           one rank's view as a single torch.save file

Exit status: 0 success (``verify``: intact; ``diff``: no difference), 1 the
check ran and found a problem (``verify``: damage; ``diff``: differences),
2 bad input (missing path, not a checkpoint, corrupt manifest, bad option).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import errno
import json
import logging
import math
import os
import re
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
import torch

from . import __version__, codec, folder, layout, legacy, series, storage
from .digests import describe_difference, iter_leaves
from .errors import CheckpointError, ManifestError, TopologyMismatchError
from .manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest, FileEntry
from .names import check_name
from .patterns import Pattern
from .reading import read_component
from .topology import Partition, Topology

__all__ = ["EXIT_BAD_INPUT", "EXIT_FOUND", "EXIT_OK", "main"]

log = logging.getLogger("distckpt")

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_BAD_INPUT = 2

_PROGRESS_MIN_BYTES = 64 * 1024 * 1024
_READ_CHUNK = 8 * 1024 * 1024
_LEGACY_MANIFEST_LIMIT = 64 * 1024 * 1024


class CLIError(Exception):
    """A problem with the command's input; printed as one message, exit status 2."""


# ---------------------------------------------------------------- formatting


def human_size(n: int) -> str:
    """``812 B``, ``1.2 KiB``, ``3.4 MiB``..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def rank_text(ranks: Iterable[int]) -> str:
    """Compact rank list: ``0-3``, ``0,4``, ``0-2,5``."""
    ordered = sorted(ranks)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{ordered[i]}-{ordered[j]}")
        else:
            parts.extend(str(r) for r in ordered[i:j + 1])
        i = j + 1
    return ",".join(parts)


def sets_text(sets: Sequence[Sequence[int]], limit: int = 48) -> str:
    """Replica sets as ``{0,4} {1,5} ...``, shortened past ``limit`` characters."""
    full = " ".join("{" + rank_text(s) + "}" for s in sets)
    if len(full) <= limit:
        return full
    shown = ""
    for s in sets:
        piece = "{" + rank_text(s) + "} "
        if len(shown) + len(piece) > limit - 14:
            break
        shown += piece
    return f"{shown}... ({len(sets)} sets)"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; trailing spaces stripped."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        lines.append((indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())
    return "\n".join(lines)


def _short(path: str) -> str:
    """A path as the user would like to read it: relative when under the current directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# ------------------------------------------------------------ input handling


def load_checkpoint_dir(arg: str) -> tuple[str, CheckpointManifest]:
    """Resolve a CHECKPOINT argument to its directory and parsed manifest, or raise CLIError."""
    path = arg
    if os.path.basename(os.path.normpath(path)) == MANIFEST_NAME and os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    if not os.path.lexists(path):
        raise CLIError(f"{arg}: no such file or directory")
    if not os.path.isdir(path):
        raise CLIError(f"{arg}: not a directory (a checkpoint is a directory holding {MANIFEST_NAME})")
    manifest_file = os.path.join(path, MANIFEST_NAME)
    if not os.path.lexists(manifest_file):
        raise CLIError(_not_a_checkpoint(arg, path))
    try:
        return path, CheckpointManifest.load(manifest_file)
    except ManifestError as exc:
        raise CLIError(f"{arg}: corrupt or unreadable manifest: {exc}") from None


def _not_a_checkpoint(arg: str, path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    if legacy.is_legacy_checkpoint(path):
        return (f"{arg}: a checkpoint of the original implementation (no {MANIFEST_NAME}); "
                f"convert it with `distckpt convert {arg} NEW_CHECKPOINT_DIR`")
    if name.startswith(".") and ".staging-" in name:
        return f"{arg}: the staging directory of a save that never committed (incomplete; not a checkpoint)"
    if name.startswith(".") and ".trash-" in name:
        return f"{arg}: a checkpoint being deleted (retention or overwrite); not a checkpoint"
    if name.startswith(".") and ".replaced-" in name:
        return (f"{arg}: the old checkpoint of an interrupted overwrite=True (restored to its name by the "
                "next listing or save when that name is free)")
    if os.path.isdir(os.path.join(path, "checkpoints")) or any(
        os.path.isfile(os.path.join(path, n, MANIFEST_NAME)) for n in _listdir(path)
    ):
        return f"{arg}: a directory of checkpoints, not a checkpoint; list them with `distckpt ls {arg}`"
    return f"{arg}: not a distckpt checkpoint (no {MANIFEST_NAME}; it is written last, so a save may have failed)"


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _files_of(comp: ComponentManifest, rank: int) -> tuple[FileEntry, ...]:
    try:
        return comp.files_for_rank(rank)
    except KeyError as exc:
        raise CLIError(str(exc.args[0])) from None


def _sets_of(comp: ComponentManifest) -> dict[str, list[FileEntry]]:
    """Files by replica set, named by the set's first file; parts of a balanced write in order."""
    by_ranks: dict[tuple[int, ...], list[FileEntry]] = {}
    for f in comp.files:
        by_ranks.setdefault(f.ranks, []).append(f)
    return {group[0].path: group for group in (sorted(g, key=lambda f: f.part) for g in by_ranks.values())}


def read_state(checkpoint: str, entries: FileEntry | Sequence[FileEntry]) -> Any:
    """Read, verify (size and checksum) and decode one replica set's file (or all its parts)."""
    return read_component(checkpoint, [entries] if isinstance(entries, FileEntry) else list(entries))


# ------------------------------------------------------------------------ ls


def _classify(entry: series.CheckpointEntry) -> tuple[str, str]:
    """(status word, reason) for a directory without a readable manifest."""
    name = os.path.basename(entry.path)
    if entry.problem == "is a symlink":
        return "skipped", "a symlink (checkpoints are never read through symlinks)"
    if name.startswith(".") and ".staging-" in name:
        return "incomplete", ("staging directory of a save in progress or one that never committed "
                              "(removed by the next save once its process is gone)")
    if name.startswith(".") and ".trash-" in name:
        return "incomplete", "being deleted (retention; removed by the next save)"
    if name.startswith(".") and ".replaced-" in name:
        return "incomplete", "old checkpoint of an interrupted overwrite (restored when its name is free)"
    if not os.path.lexists(os.path.join(entry.path, MANIFEST_NAME)):
        if legacy.is_legacy_checkpoint(entry.path):
            return "legacy", "original-format checkpoint; convert with `distckpt convert`"
        return "incomplete", f"no {MANIFEST_NAME} (never committed, or not a checkpoint)"
    reason = entry.problem or "unreadable manifest"
    for prefix in (os.path.join(entry.path, MANIFEST_NAME) + ": ", entry.path + ": "):
        reason = reason.removeprefix(prefix)
    return "corrupt", f"{MANIFEST_NAME}: {reason}"


def cmd_ls(args: argparse.Namespace) -> int:
    root: str = args.output_dir
    if not os.path.lexists(root):
        raise CLIError(f"{root}: no such directory")
    if not os.path.isdir(root):
        raise CLIError(f"{root}: not a directory")
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        raise CLIError(f"{root}: a checkpoint, not a directory of checkpoints; use `distckpt inspect {root}`")
    nested = os.path.join(root, "checkpoints")
    parent = nested if os.path.isdir(nested) and not os.path.islink(nested) else root
    entries = series.list_checkpoints(parent, include_hidden=True)
    committed = [e for e in entries if e.manifest is not None]
    broken = [e for e in entries if e.manifest is None]
    latest = committed[-1].path if committed else None
    if args.json:
        out = []
        for e in committed:
            m = e.manifest
            assert m is not None
            out.append({"name": os.path.basename(e.path), "path": e.path, "status": "committed",
                        "latest": e.path == latest, "checkpoint_id": m.checkpoint_id, "sequence": m.sequence,
                        "timestamp": m.timestamp, "world_size": m.world_size,
                        "components": len(m.components), "files": sum(len(c.files) for c in m.components.values()),
                        "size_bytes": sum(c.size_bytes for c in m.components.values())})
        for e in broken:
            status, reason = _classify(e)
            out.append({"name": os.path.basename(e.path), "path": e.path, "status": status,
                        "latest": False, "problem": reason})
        print(json.dumps({"directory": parent, "checkpoints": out}, indent=2))
        return EXIT_OK
    if not entries:
        print(f"no checkpoints in {_short(parent)}")
        return EXIT_OK
    if committed:
        rows = []
        for e in committed:
            m = e.manifest
            assert m is not None
            rows.append([
                "*" if e.path == latest else "",
                os.path.basename(e.path), m.checkpoint_id, str(m.sequence), m.timestamp, str(m.world_size),
                str(len(m.components)), str(sum(len(c.files) for c in m.components.values())),
                human_size(sum(c.size_bytes for c in m.components.values())),
                "committed, latest" if e.path == latest else "committed",
            ])
        print(f"checkpoints in {_short(parent)}, oldest to newest (* = latest, what a load without a path picks):")
        print(table(["", "NAME", "ID", "SEQ", "SAVED (UTC)", "WORLD", "COMPONENTS", "FILES", "SIZE", "STATUS"],
                    rows, indent="  "))
    else:
        print(f"no committed checkpoint in {_short(parent)}")
    if broken:
        print("not loadable:")
        print(table(["NAME", "STATUS", "WHY"],
                    [[os.path.basename(e.path), *_classify(e)] for e in broken], indent="  "))
    return EXIT_OK


# ------------------------------------------------------------------- inspect


def _topology_lines(m: CheckpointManifest) -> list[tuple[str, str]]:
    out = []
    nodes = m.topology.get("nodes")
    if isinstance(nodes, list) and nodes:
        text = "; ".join(f"node {i} = ranks {rank_text(n)}" for i, n in enumerate(nodes) if _ints(n))
        out.append(("nodes", f"{len(nodes)}: {text}"))
    groups = m.topology.get("groups")
    if isinstance(groups, dict):
        for name, part in sorted(groups.items()):
            if isinstance(part, list) and all(_ints(s) for s in part):
                out.append((f"group {name}", sets_text(part, limit=200)))
    return out


def _ints(value: Any) -> bool:
    """A list of rank numbers (what a hostile manifest's topology may not be)."""
    return isinstance(value, list) and all(type(r) is int for r in value)


def cmd_inspect(args: argparse.Namespace) -> int:
    if os.path.isdir(args.checkpoint) and not os.path.lexists(os.path.join(args.checkpoint, MANIFEST_NAME)) \
            and legacy.is_legacy_checkpoint(args.checkpoint):
        return _inspect_legacy(args)
    path, m = load_checkpoint_dir(args.checkpoint)
    if args.json:
        print(json.dumps({"path": os.path.abspath(path), "manifest": m.to_dict()}, indent=2))
        return EXIT_OK
    total = sum(c.size_bytes for c in m.components.values())
    nfiles = sum(len(c.files) for c in m.components.values())
    header = [
        ("checkpoint", _short(path)),
        ("id", f"{m.checkpoint_id} (sequence {m.sequence})"),
        ("saved", f"{m.timestamp} by distckpt {m.library_version or '?'}, torch {m.pytorch_version or '?'} "
                  f"(format {m.format_version})"),
        ("world", f"{m.world_size} rank{'s' if m.world_size != 1 else ''}"),
        *_topology_lines(m),
        ("contents", f"{len(m.components)} components, {nfiles} files, {human_size(total)} ({total} bytes)"),
    ]
    width = max(len(k) for k, _ in header)
    for k, v in header:
        print(f"{k.ljust(width)}  {v}")
    print()
    rows = []
    for key in sorted(m.components):
        c = m.components[key]
        rows.append([
            key, c.describe_pattern(), rank_text(c.ranks),
            sets_text(c.replicated_across), str(len(c.files)), human_size(c.size_bytes),
            c.validation or "-", "yes" if c.required else "no",
        ])
    print(table(["COMPONENT", "PATTERN", "WRITERS", "REPLICA SETS", "FILES", "SIZE", "VALIDATION", "REQUIRED"], rows))
    if args.files:
        print()
        file_rows = []
        for key in sorted(m.components):
            for f in m.components[key].files:
                file_rows.append([f.path, rank_text(f.ranks), str(f.writer), str(f.size_bytes), f.checksum])
        print(table(["FILE", "RANKS", "WRITER", "BYTES", "CHECKSUM"], file_rows))
    if m.extra:
        print()
        print("other manifest fields: " + ", ".join(sorted(m.extra)))
    return EXIT_OK


def _inspect_legacy(args: argparse.Namespace) -> int:
    path: str = args.checkpoint
    files = legacy.legacy_inventory(path)
    if args.json:
        print(json.dumps({"path": os.path.abspath(path), "format": "original", "files": [
            {"name": f.name, "key": f.key, "kind": f.kind, "writer": f.writer, "group": f.group, "node": f.node}
            for f in files]}, indent=2))
        return EXIT_OK
    print(f"{_short(path)}: a checkpoint of the original implementation (no {MANIFEST_NAME}, no checksums)")
    print(f"convert it with `distckpt convert {path} NEW_CHECKPOINT_DIR` (see docs/migration.md)")
    print()
    kinds = {"shared": "global/replicated", "rank": "per_rank", "group": "per_group", "node": "per_node"}
    rows = []
    for f in files:
        where = f"group {f.group}" if f.group else (f"node {f.node}" if f.node is not None else "")
        size = os.path.getsize(os.path.join(path, f.name))
        rows.append([f.key, kinds[f.kind], "" if f.writer is None else str(f.writer), where, human_size(size), f.name])
    print(table(["COMPONENT", "PATTERN (from name)", "WRITER", "SET", "SIZE", "FILE"], rows))
    return EXIT_OK


# -------------------------------------------------------------------- verify


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: the file (or ``manifest``) and why."""

    what: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.what.upper():<9} {self.path}: {self.message}"


class _Progress:
    """A one-line byte counter on stderr, only when stderr is a terminal and the job is large."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.enabled = enabled and total >= _PROGRESS_MIN_BYTES
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.stream.write(f"\rverify: {pct:5.1f}%  {human_size(self.done)} of {human_size(self.total)}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()


def _check_file(full: str, entry: FileEntry, progress: _Progress) -> str | None:
    """Stream one file through its hash; a problem description, or None when it matches."""
    algorithm, _, _ = entry.checksum.partition(":")
    try:
        hasher = storage.new_hasher(algorithm)
    except CheckpointError:
        return f"unknown checksum algorithm in manifest ({entry.checksum!r})"
    try:
        fd = storage.open_regular_file(full)  # a FIFO is refused, never waited on
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        if os.path.islink(full):
            return "is a symlink (never followed)"
        if exc.errno == errno.EINVAL and exc.strerror == "not a regular file":
            return "not a regular file"
        return f"cannot be read ({exc.strerror or exc})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != entry.size_bytes:
            progress.add(entry.size_bytes)
            return f"size is {st.st_size} bytes, the manifest says {entry.size_bytes}"
        while chunk := os.read(fd, _READ_CHUNK):
            hasher.update(chunk)
            progress.add(len(chunk))
    finally:
        os.close(fd)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != entry.checksum:
        return f"checksum mismatch (manifest {entry.checksum}, file {actual}): corrupt or modified"
    return None


def _manifest_problems(m: CheckpointManifest) -> list[Problem]:
    """Internal consistency of the manifest: sets, writers, totals, a partition of the world."""
    out: list[Problem] = []
    seen_paths: dict[str, str] = {}
    for key in sorted(m.components):
        c = m.components[key]
        where = f"components.{key}"

        def bad(message: str, where: str = where) -> None:
            out.append(Problem("manifest", where, message))

        if not c.files:
            bad("lists no file")
            continue
        firsts = [f for f in c.files if f.part == 0]  # one per replica set (a balanced write has parts)
        if tuple(f.ranks for f in firsts) != tuple(c.replicated_across):
            bad("replicated_across does not match the ranks of its files")
        if tuple(sorted(c.ranks)) != tuple(sorted(f.writer for f in c.files)):
            bad(f"writers {list(c.ranks)} do not match its files' writers {[f.writer for f in c.files]}")
        for f in c.files:
            if f.writer not in f.ranks:
                bad(f"file {f.path}: writer {f.writer} is not in its replica set {list(f.ranks)}")
            if f.path in seen_paths:
                bad(f"file {f.path} is also listed by component {seen_paths[f.path]!r}")
            seen_paths[f.path] = key
        members = sorted(r for f in firsts for r in f.ranks)
        if len(members) != m.world_size or members != list(range(len(members))):  # never range(a forged size)
            bad(f"its replica sets do not partition the {m.world_size} ranks of the world")
        if c.size_bytes != sum(f.size_bytes for f in c.files):
            bad(f"size_bytes {c.size_bytes} is not the sum of its files' sizes")
        if c.checksum is not None:
            algorithm = c.checksum.partition(":")[0]
            try:
                expected = storage.checksum_of("\n".join(f.checksum for f in c.files).encode(), algorithm)
            except CheckpointError:
                bad(f"unknown checksum algorithm {c.checksum!r}")
            else:
                if expected != c.checksum:
                    bad("component checksum does not match its files' checksums")
    return out


def _unlisted(path: str, listed: set[str]) -> list[Problem]:
    """Files and directories in the checkpoint that the manifest does not list."""
    out: list[Problem] = []
    dirs = {p.split("/")[0] for p in listed}
    for name in _listdir(path):
        full = os.path.join(path, name)
        if name == MANIFEST_NAME and not os.path.islink(full):
            continue
        if os.path.islink(full):
            out.append(Problem("unlisted", name, "symlink not listed in the manifest"))
        elif os.path.isdir(full):
            if name not in dirs:
                out.append(Problem("unlisted", name + "/", "directory not listed in the manifest"))
                continue
            for sub in _listdir(full):
                rel = f"{name}/{sub}"
                if rel in listed:
                    continue
                kind = "symlink" if os.path.islink(os.path.join(full, sub)) else (
                    "directory" if os.path.isdir(os.path.join(full, sub)) else "file")
                out.append(Problem("unlisted", rel, f"{kind} not listed in the manifest"))
        else:
            out.append(Problem("unlisted", name, "file not listed in the manifest"))
    return out


def verify_checkpoint(path: str, m: CheckpointManifest, progress: _Progress | None = None) -> tuple[list[Problem], int, int]:
    """Check every listed file's size and checksum and look for unlisted files.

    Returns ``(problems, files checked, bytes listed)``. Reads each file in
    chunks, so memory stays flat however large the checkpoint.
    """
    entries = [f for key in sorted(m.components) for f in m.components[key].files]
    total = sum(f.size_bytes for f in entries)
    progress = progress or _Progress(total, sys.stderr, enabled=False)
    problems = _manifest_problems(m)
    listed: set[str] = set()
    try:
        for f in entries:
            listed.add(f.path)
            try:
                full = storage.safe_join(path, f.path)
            except CheckpointError as exc:
                problems.append(Problem("bad", f.path, str(exc).removeprefix(path + ": ")))
                continue
            message = _check_file(full, f, progress)
            if message == "missing":
                problems.append(Problem("missing", f.path, "listed in the manifest but not on disk"))
            elif message is not None:
                problems.append(Problem("bad", f.path, message))
    finally:
        progress.close()
    problems += _unlisted(path, listed)
    return problems, len(entries), total


def cmd_verify(args: argparse.Namespace) -> int:
    path, m = load_checkpoint_dir(args.checkpoint)
    total = sum(c.size_bytes for c in m.components.values())
    progress = _Progress(total, sys.stderr, enabled=sys.stderr.isatty() and not args.quiet)
    problems, nfiles, total = verify_checkpoint(path, m, progress)
    if problems:
        for p in problems:
            print(p)
        bad_files = sorted({p.path for p in problems if p.what != "manifest"})
        print(f"NOT INTACT: {_short(path)}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
              + (f" ({len(bad_files)} file{'s' if len(bad_files) != 1 else ''}: {', '.join(bad_files)})"
                 if bad_files else ""))
        return EXIT_FOUND
    if not args.quiet:
        print(f"intact: {_short(path)}: {nfiles} files, {human_size(total)}; every size and checksum "
              "matches the manifest and no file is unlisted")
    return EXIT_OK


# ---------------------------------------------------------------------- diff


def _leaf_equal(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return bool(a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes())
    if isinstance(a, np.generic):
        return bool(a.dtype == b.dtype and a.tobytes() == b.tobytes())
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _tensor_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    x = a.detach().cpu().contiguous()
    y = b.detach().cpu().contiguous()
    return bytes(codec.tensor_bytes(x)) == bytes(codec.tensor_bytes(y))


def _tensor_type(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _value_text(v: Any, kind: str) -> str:
    if kind == "tensor":
        return "tensor " + _tensor_type(v)
    if kind != "leaf":
        return kind.split("[", 1)[0]
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def compare_states(a: Any, b: Any) -> list[str]:
    """Every entry that differs between two decoded states, one line each (A's order, then B's)."""
    la = {p: (kind, leaf) for p, kind, leaf in iter_leaves(a)}
    lb = {p: (kind, leaf) for p, kind, leaf in iter_leaves(b)}
    order = list(la) + [p for p in lb if p not in la]
    out: list[str] = []
    gone: list[str] = []

    def under_gone(p: str) -> bool:
        return any(p.startswith(g + ".") or g == "" for g in gone)

    for p in order:
        name = p or "<root>"
        if under_gone(p):
            continue
        if p not in lb or p not in la:
            side = "A" if p in la else "B"
            kind, leaf = la[p] if p in la else lb[p]
            out.append(f"{name}: only in {side} ({_value_text(leaf, kind)})")
            gone.append(p)
            continue
        (ka, va), (kb, vb) = la[p], lb[p]
        if ka == "tensor" and kb == "tensor":
            if not _tensor_equal(va, vb):
                out.append(f"{name}: {describe_difference(va, vb)}")
        elif ka not in ("tensor", "leaf") and kb not in ("tensor", "leaf"):
            ta, tb = ka.split("[", 1)[0], kb.split("[", 1)[0]
            if ta != tb:
                out.append(f"{name}: {ta} in A, {tb} in B")
        elif ka != kb:
            out.append(f"{name}: {_value_text(va, ka)} in A, {_value_text(vb, kb)} in B")
            gone.append(p)
        elif not _leaf_equal(va, vb):
            out.append(f"{name}: {_value_text(va, ka)} in A, {_value_text(vb, kb)} in B")
    return out


def _diff_component(pa: str, ca: ComponentManifest, pb: str, cb: ComponentManifest, limit: int) -> list[str]:
    lines: list[str] = []
    if ca.describe_pattern() != cb.describe_pattern():
        return [f"  pattern: {ca.describe_pattern()} in A, {cb.describe_pattern()} in B (files not compared)"]
    if tuple(ca.replicated_across) != tuple(cb.replicated_across):
        lines.append(f"  replica sets: {sets_text(ca.replicated_across)} in A, {sets_text(cb.replicated_across)} in B")
    fa = _sets_of(ca)
    fb = _sets_of(cb)
    for path in list(fa) + [p for p in fb if p not in fa]:
        if path not in fb or path not in fa:
            lines.append(f"  {path}: only in {'A' if path in fa else 'B'}")
            continue
        ga, gb = fa[path], fb[path]
        ea, eb = ga[0], gb[0]
        if [(f.path, f.size_bytes, f.checksum) for f in ga] == [(f.path, f.size_bytes, f.checksum) for f in gb]:
            # Same recorded content: only make sure both files still hold it.
            for side, root, group in (("A", pa, ga), ("B", pb, gb)):
                for entry in group:
                    problem = _check_file(storage.safe_join(root, entry.path), entry,
                                          _Progress(0, sys.stderr, False))
                    if problem is not None:
                        raise CLIError(f"cannot compare {entry.path}: {side}'s copy is damaged ({problem}); "
                                       f"run `distckpt verify` on it")
            continue
        try:
            entries = compare_states(read_state(pa, ga), read_state(pb, gb))
        except CheckpointError as exc:
            raise CLIError(f"cannot compare {path}: {exc} (check both with `distckpt verify`)") from None
        if ea.ranks != eb.ranks:
            lines.append(f"  {path}: ranks {rank_text(ea.ranks)} in A, {rank_text(eb.ranks)} in B")
        if not entries:
            continue
        lines.append(f"  {path} (ranks {rank_text(ea.ranks)}): {len(entries)} "
                     f"entr{'y differs' if len(entries) == 1 else 'ies differ'}")
        shown = entries if limit <= 0 else entries[:limit]
        lines += [f"    {e}" for e in shown]
        if len(shown) < len(entries):
            lines.append(f"    ... and {len(entries) - len(shown)} more (--max-entries 0 shows all)")
    return lines


def cmd_diff(args: argparse.Namespace) -> int:
    pa, ma = load_checkpoint_dir(args.a)
    pb, mb = load_checkpoint_dir(args.b)
    print(f"A: {_short(pa)} (id {ma.checkpoint_id}, world {ma.world_size})")
    print(f"B: {_short(pb)} (id {mb.checkpoint_id}, world {mb.world_size})")
    differ = 0
    if ma.world_size != mb.world_size:
        print(f"world size: {ma.world_size} in A, {mb.world_size} in B")
        differ += 1
    keys = sorted(set(ma.components) | set(mb.components))
    changed = 0
    for key in keys:
        if key not in mb.components or key not in ma.components:
            c = ma.components.get(key) or mb.components[key]
            print(f"component {key!r} ({c.describe_pattern()}): only in "
                  f"{'A' if key in ma.components else 'B'}")
            changed += 1
            continue
        lines = _diff_component(pa, ma.components[key], pb, mb.components[key], args.max_entries)
        if lines:
            c = ma.components[key]
            print(f"component {key!r} ({c.describe_pattern()}):")
            print("\n".join(lines))
            changed += 1
    if changed or differ:
        print(f"DIFFERENT: {changed} of {len(keys)} components differ")
        return EXIT_FOUND
    print(f"same state: {len(keys)} components, {sum(len(c.files) for c in ma.components.values())} files")
    return EXIT_OK


# ------------------------------------------------------------------- convert


def parse_ranks(text: str) -> tuple[int, ...]:
    """``0,4`` or ``0-3`` or ``0-2,7`` -> sorted ranks; ``ValueError`` otherwise."""
    ranks: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            lo, hi = int(m[1]), int(m[2])
            if hi < lo:
                raise ValueError(f"empty rank range {part!r}")
            ranks.update(range(lo, hi + 1))
        elif part.isdigit():
            ranks.add(int(part))
        else:
            raise ValueError(f"{part!r} is not a rank or a range like 0-3")
    return tuple(sorted(ranks))


def parse_partition(text: str) -> Partition:
    """``0,4/1,5/2,6/3,7`` -> ((0, 4), (1, 5), (2, 6), (3, 7))."""
    return tuple(parse_ranks(s) for s in text.split("/"))


def mesh_partitions(dims: Sequence[tuple[str, int]]) -> dict[str, Partition]:
    """Groups of a row-major device mesh (``init_device_mesh`` order): for each
    dimension, the sets of ranks that differ only in that coordinate."""
    sizes = [size for _, size in dims]
    world = math.prod(sizes)
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    out: dict[str, Partition] = {}
    for d, (name, size) in enumerate(dims):
        sets = {}
        for rank in range(world):
            coord = (rank // strides[d]) % size
            base = rank - coord * strides[d]
            sets[base] = tuple(base + i * strides[d] for i in range(size))
        out[name] = tuple(sorted(sets.values()))
    return out


def _parse_mesh(text: str) -> list[tuple[str, int]]:
    dims = []
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise CLIError(f"--mesh: {part!r} is not NAME=SIZE (e.g. --mesh dp=2,tp=4)")
        dims.append((name.strip(), int(size)))
    return dims


def _read_legacy_manifest(src: str) -> dict[str, Any]:
    """The original's ``checkpoint_manifest.json`` as hints (JSON only); ``{}`` when absent or unreadable."""
    path = os.path.join(src, legacy.LEGACY_MANIFEST)
    if not os.path.isfile(path) or os.path.islink(path):
        return {}
    try:
        if os.path.getsize(path) > _LEGACY_MANIFEST_LIMIT:
            raise ValueError("too large")
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        log.warning("distckpt: ignoring %s: %s", path, exc)
        return {}
    return raw if isinstance(raw, dict) else {}


@dataclass(frozen=True)
class _Planned:
    key: str
    pattern: Pattern
    group: str | None
    plan: layout.ComponentPlan
    sources: Mapping[str, str]  # new relative path -> legacy file name


def _legacy_hint_pattern(hints: Mapping[str, Any], key: str) -> str | None:
    comps = hints.get("components")
    if not isinstance(comps, dict) or not isinstance(comps.get(key), dict):
        return None
    value = comps[key].get("sharing_pattern")
    return value.lower() if isinstance(value, str) else None


def plan_conversion(
    files: Sequence[legacy.LegacyFile], topology: Topology, overrides: Mapping[str, str],
    hints: Mapping[str, Any], nodes_given: bool,
) -> list[_Planned]:
    """Decide every component's pattern and replica sets from the legacy names and the layout given."""
    by_key: dict[str, list[legacy.LegacyFile]] = {}
    for f in files:
        by_key.setdefault(f.key, []).append(f)
    folded: dict[str, str] = {}
    out = []
    for key in sorted(by_key):
        try:
            check_name(key, field_name="component key")
        except ValueError as exc:
            raise CLIError(f"legacy component {key!r}: {exc}") from None
        if key.casefold() in folded:
            raise CLIError(f"legacy components {folded[key.casefold()]!r} and {key!r} differ only in case")
        folded[key.casefold()] = key
        group_files = by_key[key]
        kinds = {f.kind for f in group_files}
        if len(kinds) > 1:
            raise CLIError(f"component {key!r}: files of several patterns: {[f.name for f in group_files]}")
        kind = kinds.pop()
        names = sorted({f.group for f in group_files if f.group is not None})
        if len(names) > 1:
            raise CLIError(f"component {key!r}: files of several groups {names}")
        group: str | None = names[0] if names else None
        hint = _legacy_hint_pattern(hints, key) if kind == "shared" else None
        try:
            pattern = legacy.legacy_pattern(kind, group, overrides.get(key) or hint)
        except ValueError as exc:
            raise CLIError(f"component {key!r} ({group_files[0].name}): {exc}") from None
        if group is not None and group not in topology.groups:
            raise CLIError(
                f"component {key!r} is per_group({group}) in the legacy checkpoint, whose file names record "
                f"only the writer of each group; give the group layout of the job that saved it: "
                f"--mesh {group}=N,... (a row-major device mesh) or --group {group}=0,4/1,5/... (explicit sets)")
        if kind == "node" and not nodes_given:
            raise CLIError(
                f"component {key!r} is per_node in the legacy checkpoint, whose file names record only each "
                "node's writer; give the node layout: --nproc-per-node N (torchrun's contiguous ranks) "
                "or --nodes 0-3/4-7")
        try:
            plan = layout.plan_component(topology, key, pattern)
        except TopologyMismatchError as exc:
            raise CLIError(f"component {key!r}: {exc}") from None
        sources: dict[str, str] = {}
        if kind == "shared":
            if len(group_files) != 1:
                raise CLIError(f"component {key!r}: several shared files {[f.name for f in group_files]}")
            sources[plan.files[0].path] = group_files[0].name
        else:
            by_writer: dict[int, legacy.LegacyFile] = {}
            for f in group_files:
                assert f.writer is not None
                if not 0 <= f.writer < topology.world_size:
                    raise CLIError(f"component {key!r}: {f.name} was written by rank {f.writer}, outside the "
                                   f"world of {topology.world_size} ranks (check --world-size)")
                by_writer[f.writer] = f
            for fp in plan.files:
                mine = [by_writer[r] for r in fp.ranks if r in by_writer]
                if not mine:
                    raise CLIError(f"component {key!r}: no legacy file for replica set {{{rank_text(fp.ranks)}}} "
                                   f"(expected one written by one of those ranks); is the layout right?")
                if len(mine) > 1:
                    raise CLIError(f"component {key!r}: several legacy files for replica set "
                                   f"{{{rank_text(fp.ranks)}}}: {[f.name for f in mine]}; is the layout right?")
                if kind == "node" and mine[0].node != topology.node_of(fp.writer):
                    raise CLIError(f"component {key!r}: {mine[0].name} says node {mine[0].node}, but the layout "
                                   f"given puts rank {mine[0].writer} on node {topology.node_of(fp.writer)}")
                sources[fp.path] = mine[0].name
        out.append(_Planned(key, pattern, group, plan, sources))
    return out


def _conversion_topology(args: argparse.Namespace, hints: Mapping[str, Any]) -> tuple[Topology, bool]:
    groups: dict[str, Partition] = {}
    if args.mesh:
        groups.update(mesh_partitions(_parse_mesh(args.mesh)))
    for spec in args.group or []:
        name, sep, sets = spec.partition("=")
        if not sep:
            raise CLIError(f"--group: {spec!r} is not NAME=SETS (e.g. --group dp=0,4/1,5/2,6/3,7)")
        try:
            groups[name.strip()] = parse_partition(sets)
        except ValueError as exc:
            raise CLIError(f"--group {name}: {exc}") from None
    world = args.world_size
    if world is None and isinstance(hints.get("world_size"), int) and not isinstance(hints["world_size"], bool):
        world = hints["world_size"]
    if world is None and groups:
        world = max(r for part in groups.values() for s in part for r in s) + 1
    if world is None and args.nproc_per_node is None and args.nodes:
        try:
            world = max(parse_ranks(args.nodes.replace("/", ","))) + 1
        except ValueError as exc:
            raise CLIError(f"--nodes: {exc}") from None
    if world is None:
        raise CLIError("pass --world-size N: the number of ranks of the job that saved this checkpoint "
                       "(legacy file names do not record it)")
    if world < 1:
        raise CLIError("--world-size must be positive")
    nodes: Partition = (tuple(range(world)),)
    nodes_given = False
    if args.nproc_per_node is not None:
        n = args.nproc_per_node
        if n < 1 or world % n:
            raise CLIError(f"--nproc-per-node {n} does not divide the world of {world} ranks")
        nodes = tuple(tuple(range(i, i + n)) for i in range(0, world, n))
        nodes_given = True
    elif args.nodes:
        try:
            nodes = parse_partition(args.nodes)
        except ValueError as exc:
            raise CLIError(f"--nodes: {exc}") from None
        nodes_given = True
    try:
        return Topology(world, nodes, groups), nodes_given
    except (TopologyMismatchError, ValueError) as exc:
        raise CLIError(f"the layout given is not valid for a world of {world} ranks: {exc}") from None


def cmd_convert(args: argparse.Namespace) -> int:
    if args.to_torch is not None:
        return _export_torch(args)
    if len(args.paths) != 2:
        raise CLIError("expected SRC DST (or --to-torch FILE --rank R CHECKPOINT)")
    src, dst = args.paths
    if not os.path.isdir(src):
        raise CLIError(f"{src}: no such directory" if not os.path.lexists(src) else f"{src}: not a directory")
    if os.path.lexists(os.path.join(src, MANIFEST_NAME)):
        raise CLIError(f"{src}: already a distckpt checkpoint (it has {MANIFEST_NAME}); nothing to convert")
    files = legacy.legacy_inventory(src)
    if not files:
        raise CLIError(f"{src}: no original-format files (<key>_state.pt, <key>_state_rank_<r>.pt, ...) in it")
    final = os.path.abspath(dst)
    if os.path.lexists(final):
        raise CLIError(f"{dst}: already exists; choose a new directory")
    try:
        check_name(os.path.basename(final), field_name="DST directory name")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    overrides: dict[str, str] = {}
    for spec in args.pattern or []:
        key, sep, value = spec.partition("=")
        if not sep or not value:
            raise CLIError(f"--pattern {spec!r}: expected KEY=PATTERN")
        overrides[key] = value.lower()
    unknown = sorted(set(overrides) - {f.key for f in files})
    if unknown:
        raise CLIError(f"--pattern: no component {unknown} in {src}")
    hints = _read_legacy_manifest(src)
    topology, nodes_given = _conversion_topology(args, hints)
    planned = plan_conversion(files, topology, overrides, hints, nodes_given)

    name = os.path.basename(final)
    cid = args.checkpoint_id or (name.removeprefix("checkpoint-") if name.startswith("checkpoint-") and
                                 len(name) > len("checkpoint-") else name)
    try:
        check_name(cid, field_name="--checkpoint-id")
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    parent = os.path.dirname(final)
    sequence = args.sequence
    if sequence is None:
        sequence = max((e.manifest.sequence for e in series.list_checkpoints(parent) if e.manifest), default=0) + 1
    staging = folder.create_staging(final, uuid.uuid4().hex[:12], sequence)
    try:
        components: dict[str, ComponentManifest] = {}
        origin: dict[str, str] = {}
        for p in planned:
            entries = []
            storage.make_component_dir(staging, p.key)
            for fp in p.plan.files:
                legacy_name = p.sources[fp.path]
                state = legacy.read_legacy_file(os.path.join(src, legacy_name))
                encoded = codec.encode(state)
                size, checksum = storage.write_file(os.path.join(staging, fp.path), encoded.chunks())
                entries.append(FileEntry(fp.path, fp.ranks, fp.writer, size, checksum))
                origin[fp.path] = legacy_name
                log.info("distckpt: converted %s -> %s (%d bytes)", legacy_name, fp.path, size)
            components[p.key] = ComponentManifest(
                key=p.key, sharing_pattern=p.pattern.kind, group_name=p.group, params=p.pattern.params(),
                ranks=p.plan.writers,
                replicated_across=p.plan.replica_sets, files=tuple(entries), required=True, validation=None,
                size_bytes=sum(e.size_bytes for e in entries),
                checksum=storage.checksum_of("\n".join(e.checksum for e in entries).encode()),
            )
            storage.fsync_dir(os.path.join(staging, p.key))
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        manifest = CheckpointManifest(
            checkpoint_id=cid, world_size=topology.world_size, timestamp=stamp, components=components,
            topology=topology.to_dict(), sequence=sequence, library_version=__version__,
            pytorch_version=torch.__version__,
            extra={"converted_from": {"format": "original", "path": os.path.abspath(src), "files": origin}},
        )
        manifest.save(os.path.join(staging, MANIFEST_NAME))
        storage.fsync_dir(staging)
        folder.commit_directory(staging, final, overwrite=False)
    except BaseException:
        folder.discard_staging(staging)
        raise
    total = sum(c.size_bytes for c in components.values())
    print(f"converted {_short(src)} -> {_short(final)}: {len(components)} components, "
          f"{sum(len(c.files) for c in components.values())} files, {human_size(total)}, world {topology.world_size}")
    print(table(["COMPONENT", "PATTERN", "REPLICA SETS", "FROM"],
                [[p.key, p.pattern.describe(), sets_text(p.plan.replica_sets),
                  ", ".join(p.sources[f.path] for f in p.plan.files)] for p in planned], indent="  "))
    return EXIT_OK


def _clone_tree(obj: Any, found_numpy: list[bool]) -> Any:
    """Copy tensors out of the file buffer so each is saved with just its own storage."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (np.ndarray, np.generic)):
        found_numpy[0] = True
        return obj
    if isinstance(obj, dict):
        copy = type(obj)((k, _clone_tree(v, found_numpy)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata  # type: ignore[attr-defined]
        return copy
    if isinstance(obj, list):
        return [_clone_tree(v, found_numpy) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v, found_numpy) for v in obj)
    return obj


def _export_torch(args: argparse.Namespace) -> int:
    if len(args.paths) != 1:
        raise CLIError("--to-torch FILE takes exactly one CHECKPOINT")
    if args.rank is None:
        raise CLIError("--to-torch needs --rank R: the rank whose view to export")
    path, m = load_checkpoint_dir(args.paths[0])
    rank: int = args.rank
    if not 0 <= rank < m.world_size:
        raise CLIError(f"--rank {rank}: the checkpoint was saved by a world of {m.world_size} ranks (0-{m.world_size - 1})")
    target = os.path.abspath(args.to_torch)
    if os.path.lexists(target) and not args.force:
        raise CLIError(f"{args.to_torch}: already exists (pass --force to replace it)")
    found_numpy = [False]
    out: dict[str, Any] = {}
    used: dict[str, str] = {}
    for key in sorted(m.components):
        group = _files_of(m.components[key], rank)
        entry = group[0]
        try:
            out[key] = _clone_tree(read_state(path, group), found_numpy)
        except CheckpointError as exc:
            raise CLIError(f"cannot read {entry.path}: {exc}") from None
        used[key] = entry.path
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        torch.save(out, tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {_short(target)}: rank {rank}'s view of {_short(path)} ({len(out)} components: "
          + ", ".join(f"{k} <- {v}" for k, v in used.items()) + ")")
    if found_numpy[0]:
        print("note: it holds NumPy values (e.g. RNG state); torch.load(weights_only=True) needs them allowed "
              "with torch.serialization.safe_globals, or load a file you trust with weights_only=False")
    return EXIT_OK


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distckpt",
        description="Look at, check, compare and convert distckpt checkpoints.",
        epilog="Exit status: 0 success; 1 verify found damage or diff found differences; 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"distckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("ls", help="list checkpoints oldest to newest, marking the latest and broken ones",
                       description="List the checkpoints of an output directory (or of its checkpoints/ "
                                   "folder) oldest to newest, marking the latest committed one and every "
                                   "incomplete or corrupt directory with the reason.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="components, patterns, writers, files and topology of a checkpoint",
                       description="Show what a checkpoint holds: each component's pattern, group, writers, "
                                   "replica sets, files, size and validation, and the topology it was saved with.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--files", action="store_true", help="also list every file with its ranks and checksum")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="recompute every size and checksum; exit 0 only if intact",
                       description="Recompute every file's size and checksum and compare them with the "
                                   "manifest; report missing, damaged and unlisted files. Exit status 0 only "
                                   "if the checkpoint is intact.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems; no progress")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("diff", help="components, entries and tensors that differ between two checkpoints",
                       description="Compare two checkpoints file by file: components, entries and tensors that "
                                   "differ, with the largest absolute difference for tensors. Exit status 1 "
                                   "when they differ.")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")
    p.add_argument("--max-entries", type=int, default=20, metavar="N",
                   help="differing entries shown per file (0: all; default 20)")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "convert", help="original-format checkpoint -> distckpt; or --to-torch: one rank's view as a torch file",
        description="convert SRC DST: rewrite a checkpoint of the original implementation (*_state*.pt files) "
                    "as a distckpt checkpoint with a manifest and checksums; files are read with "
                    "torch.load(weights_only=True) only. convert --to-torch FILE --rank R CHECKPOINT: write "
                    "what rank R would load from CHECKPOINT as one torch.save file {component: state}.",
        usage="distckpt convert [options] SRC DST\n       distckpt convert --to-torch FILE --rank R [--force] CHECKPOINT",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="ranks of the job that saved SRC (default: from checkpoint_manifest.json or the layout)")
    p.add_argument("--mesh", metavar="NAME=SIZE,...",
                   help="the job's row-major device mesh, e.g. dp=2,tp=4: its dimensions become the groups")
    p.add_argument("--group", action="append", metavar="NAME=SETS",
                   help="a group partition, sets split by '/', e.g. dp=0,4/1,5/2,6/3,7 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="nodes hold N contiguous ranks (torchrun)")
    p.add_argument("--nodes", metavar="SETS", help="explicit nodes, e.g. 0-3/4-7")
    p.add_argument("--pattern", action="append", metavar="KEY=PATTERN",
                   help="global or replicated for a shared <key>_state.pt (default: as checkpoint_manifest.json "
                        "says, else global)")
    p.add_argument("--checkpoint-id", metavar="ID", help="default: DST's name without 'checkpoint-'")
    p.add_argument("--sequence", type=int, metavar="N",
                   help="order among DST's siblings (default: one more than the newest there)")
    p.add_argument("--to-torch", metavar="FILE", help="export one rank's view of CHECKPOINT to FILE")
    p.add_argument("--rank", type=int, metavar="R", help="with --to-torch: whose view")
    p.add_argument("--force", action="store_true", help="with --to-torch: replace FILE if it exists")
    p.set_defaults(func=cmd_convert)
    return parser


class _Logging:
    """Route the library's logger to stderr for the duration of one command."""

    def __init__(self, verbosity: int) -> None:
        self.logger = logging.getLogger("distckpt")
        self.level = logging.WARNING if verbosity <= 0 else (logging.INFO if verbosity == 1 else logging.DEBUG)
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self) -> None:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.level)
        self.logger.propagate = False

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 problem found, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    with _Logging(args.verbose):
        try:
            return func(args)
        except CLIError as exc:
            print(f"distckpt {args.command}: error: {exc}", file=sys.stderr)
        except CheckpointError as exc:
            print(f"distckpt {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                _silence_stdout()
                return 141
            print(f"distckpt {args.command}: error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"distckpt {args.command}: interrupted", file=sys.stderr)
            return 130
    return EXIT_BAD_INPUT


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
