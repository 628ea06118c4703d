"""Checking a committed checkpoint on disk against its manifest, from Python or the CLI.

:func:`verify_checkpoint` recomputes every listed file's size and checksum,
checks that the manifest agrees with itself (replica sets, writers, totals,
a partition of the world), and looks for files the manifest does not list.
It reads each file in chunks of a few MiB, so memory stays flat however large
the checkpoint, and never imports torch. Every file-system call goes through
:mod:`distckpt.storage`. Not collective: call it from one process, e.g. after
a save or before copying a checkpoint elsewhere. ``distckpt verify`` prints
its report.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from . import storage
from .errors import CheckpointError, CheckpointNotFoundError
from .manifest import MANIFEST_NAME, CheckpointManifest

__all__ = ["PROBLEM_KINDS", "VerificationProblem", "VerificationReport", "open_checkpoint", "verify_checkpoint"]

#: What a :class:`VerificationProblem` can be about.
PROBLEM_KINDS = ("manifest", "missing", "bad", "unlisted")


@dataclass(frozen=True)
class VerificationProblem:
    """One thing wrong with a checkpoint.

    ``what`` is ``"manifest"`` (the manifest contradicts itself; ``path`` names
    the field, e.g. ``components.model``), ``"missing"`` (a listed file is not
    on disk), ``"bad"`` (a listed file has the wrong size or checksum, or is a
    symlink or not a regular file) or ``"unlisted"`` (on disk, not in the
    manifest). ``path`` is relative to the checkpoint directory.
    """

    what: str
    path: str
    message: str

    def __post_init__(self) -> None:
        if self.what not in PROBLEM_KINDS:
            raise ValueError(f"VerificationProblem.what must be one of {PROBLEM_KINDS}, not {self.what!r}")

    def __str__(self) -> str:
        return f"{self.what.upper():<9} {self.path}: {self.message}"


@dataclass(frozen=True)
class VerificationReport:
    """What :func:`verify_checkpoint` found: ``intact`` when ``problems`` is empty.

    ``files`` and ``size_bytes`` count what the manifest lists (every file is
    checked, damaged or not).
    """

    path: str
    checkpoint_id: str
    files: int
    size_bytes: int
    problems: tuple[VerificationProblem, ...]

    def __post_init__(self) -> None:
        if self.files < 0 or self.size_bytes < 0:
            raise ValueError("VerificationReport: files and size_bytes cannot be negative")
        object.__setattr__(self, "problems", tuple(self.problems))

    @property
    def intact(self) -> bool:
        return not self.problems


def open_checkpoint(path: str | os.PathLike[str]) -> tuple[str, CheckpointManifest]:
    """Resolve a checkpoint directory (or its ``manifest.json``) to ``(directory, manifest)``.

    Called by :func:`verify_checkpoint`, :func:`~distckpt.diff_checkpoints` and
    the CLI. Raises :class:`CheckpointNotFoundError` when ``path`` is missing,
    not a directory, or holds no manifest (never committed, or not a
    checkpoint), and :class:`ManifestError` when its manifest is unreadable or
    corrupt.
    """
    text = os.fspath(path)
    info = storage.path_info(text)
    if os.path.basename(os.path.normpath(text)) == MANIFEST_NAME and info.file:
        text = os.path.dirname(os.path.abspath(text))
        info = storage.path_info(text)
    if not info.exists:
        raise CheckpointNotFoundError(f"{text}: no such file or directory")
    if not info.dir:
        raise CheckpointNotFoundError(f"{text}: not a directory (a checkpoint is a directory holding {MANIFEST_NAME})")
    manifest_file = os.path.join(text, MANIFEST_NAME)
    if not storage.path_info(manifest_file).exists:
        raise CheckpointNotFoundError(
            f"{text}: not a distckpt checkpoint (no {MANIFEST_NAME}; it is written last, so a save may have failed)")
    return text, CheckpointManifest.load(manifest_file)


def verify_checkpoint(
    path: str | os.PathLike[str], *, manifest: CheckpointManifest | None = None,
    progress: Callable[[int], None] | None = None,
) -> VerificationReport:
    """Check every file of the checkpoint at ``path`` against its manifest.

    Not collective; reads only. ``manifest`` skips reading it again when the
    caller already has it; ``progress(n)`` is called as every ``n`` bytes are
    checked. A damaged checkpoint is not an error: it is a report whose
    ``intact`` is false and whose ``problems`` name each file and why. Raises
    :class:`CheckpointNotFoundError` or :class:`ManifestError` when ``path`` is
    not a readable committed checkpoint (see :func:`open_checkpoint`).
    """
    if manifest is None:
        root, manifest = open_checkpoint(path)
    else:
        root = os.fspath(path)
    entries = [f for key in sorted(manifest.components) for f in manifest.components[key].files]
    problems = manifest_problems(manifest)
    listed: set[str] = set()
    for f in entries:
        listed.add(f.path)
        try:
            full = storage.safe_join(root, f.path)
        except CheckpointError as exc:
            problems.append(VerificationProblem("bad", f.path, str(exc).removeprefix(root + ": ")))
            continue
        fault = storage.check_file(full, f.size_bytes, f.checksum, progress)
        if fault is not None:
            problems.append(VerificationProblem(fault.kind, f.path, fault.message))
    problems += _unlisted(root, listed)
    return VerificationReport(root, manifest.checkpoint_id, len(entries), sum(f.size_bytes for f in entries),
                              tuple(problems))


def manifest_problems(m: CheckpointManifest) -> list[VerificationProblem]:
    """Internal consistency of a manifest: sets, writers, totals, a partition of the world. Pure."""
    out: list[VerificationProblem] = []
    seen_paths: dict[str, str] = {}
    for key in sorted(m.components):
        c = m.components[key]
        where = f"components.{key}"

        def bad(message: str, where: str = where) -> None:
            out.append(VerificationProblem("manifest", where, message))

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


def _kind(info: storage.PathInfo) -> str:
    return "symlink" if info.link else ("directory" if info.dir else "file")


def _unlisted(root: str, listed: set[str]) -> list[VerificationProblem]:
    """Files and directories in the checkpoint that the manifest does not list."""
    out: list[VerificationProblem] = []
    dirs = {p.split("/")[0] for p in listed}
    for name in storage.list_names(root):
        info = storage.path_info(os.path.join(root, name))
        if name == MANIFEST_NAME and not info.link:
            continue
        if info.link:
            out.append(VerificationProblem("unlisted", name, "symlink not listed in the manifest"))
        elif info.dir:
            if name not in dirs:
                out.append(VerificationProblem("unlisted", name + "/", "directory not listed in the manifest"))
                continue
            for sub in storage.list_names(os.path.join(root, name)):
                rel = f"{name}/{sub}"
                if rel not in listed:
                    kind = _kind(storage.path_info(os.path.join(root, name, sub)))
                    out.append(VerificationProblem("unlisted", rel, f"{kind} not listed in the manifest"))
        else:
            out.append(VerificationProblem("unlisted", name, "file not listed in the manifest"))
    return out
