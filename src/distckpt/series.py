"""The series: the checkpoints of one folder, oldest to newest, and the rules of adding one.

Called by the coordinator's facade (:meth:`latest_checkpoint`,
:func:`latest_committed`), the save phases on rank 0 (:func:`allocate` in the
plan phase, :func:`retain` after the commit), and the CLI
(:func:`list_checkpoints`). "Latest" is the highest manifest ``sequence``
(then timestamp, then name; never modification times); a save gets one past
every committed checkpoint and every live save; retention keeps the newest
``keep_last``. The folder's mechanics (staging, commit, cleanup, locks) are
:mod:`distckpt.folder` and :mod:`distckpt.locks`; every file system call goes
through :mod:`distckpt.storage`. Nothing here is collective.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from . import folder, storage
from .errors import CheckpointError, CheckpointExistsError, ManifestError
from .manifest import MANIFEST_NAME, CheckpointManifest
from .names import check_name

__all__ = [
    "Allocation",
    "CheckpointEntry",
    "allocate",
    "latest_committed",
    "list_checkpoints",
    "retain",
]

log = logging.getLogger("distckpt")

@dataclass(frozen=True)
class CheckpointEntry:
    """A directory under a checkpoints folder: committed (with manifest) or not (with why)."""

    path: str
    manifest: CheckpointManifest | None
    problem: str | None

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def list_checkpoints(parent: str, include_hidden: bool = False, restore: bool = True) -> list[CheckpointEntry]:
    """Every checkpoint directory in ``parent``, committed ones ordered oldest to newest.

    Order is by manifest ``sequence``, then timestamp, then name: never by
    mtime. Directories without a readable manifest come first, with the reason.
    Staging and trash directories are skipped unless ``include_hidden``.
    ``restore`` first puts back an old checkpoint stranded by an interrupted
    overwrite (:func:`restore_stranded`), so it is found under its name.
    """
    broken: list[CheckpointEntry] = []
    good: list[CheckpointEntry] = []
    for path, problem in _directories(parent, include_hidden, restore):
        if problem is not None:
            broken.append(CheckpointEntry(path, None, problem))
            continue
        try:
            good.append(CheckpointEntry(path, CheckpointManifest.load(os.path.join(path, MANIFEST_NAME)), None))
        except ManifestError as exc:
            broken.append(CheckpointEntry(path, None, str(exc)))
        except Exception as exc:  # any reason at all: one bad directory never blocks "latest" or a save
            broken.append(CheckpointEntry(path, None, f"unreadable manifest ({type(exc).__name__}: {exc})"[:500]))
    good.sort(key=lambda e: (e.manifest.sequence, e.manifest.timestamp, e.path) if e.manifest else (0, "", e.path))
    return broken + good


def _directories(parent: str, include_hidden: bool, restore: bool) -> Iterator[tuple[str, str | None]]:
    """``(path, None)`` for each directory of ``parent`` that may hold a committed checkpoint, and
    ``(path, why not)`` for a symlink or (with ``include_hidden``) a staging or trash directory;
    other entries, and hidden ones without ``include_hidden``, are left out. ``restore`` first puts
    back a checkpoint stranded by an interrupted overwrite. Local."""
    if not storage.path_info(parent).dir:
        return
    if restore:
        folder.restore_stranded(parent)
    for name in storage.list_dir(parent):
        path = os.path.join(parent, name)
        if name.startswith(".") and not include_hidden:
            continue
        info = storage.path_info(path)
        if info.link:
            yield path, "is a symlink"
        elif not info.dir:
            continue
        elif name.startswith("."):
            yield path, "staging or trash directory (incomplete)"
        else:
            yield path, None


# The folder's staging, commit and cleanup live in .series (part of this layer); callers use them from here.

Allocation = dict[str, Any]


def latest_committed(parent: str) -> str | None:
    """Path of the newest committed checkpoint in ``parent`` (highest sequence, then timestamp,
    then name, as :func:`list_checkpoints` orders them), or ``None``. Local.

    Manifests are parsed in full newest first by the sequence their first bytes give, and only
    until no other can be newer (a valid manifest's sequence is the one its start shows; one
    that does not begin as distckpt writes it is parsed in full), so "latest" costs one parse,
    not one per checkpoint of the folder.
    """
    peeked = _peeked(parent)
    best: tuple[int, str, str] | None = None
    for manifest in [m for m, seq in peeked if seq is None]:
        best = _newer(best, manifest)
    for seq, manifest in sorted(((seq, m) for m, seq in peeked if seq is not None), reverse=True):
        if best is not None and seq < best[0]:
            break  # newest first: none left can be newer
        best = _newer(best, manifest)
    return None if best is None else best[2]


#: How a manifest written by distckpt begins, up to its sequence number (``to_json``'s key order).
_SEQUENCE_AT_START = re.compile(
    rb'\A\{\s*"format": "distckpt",\s*"format_version": "[0-9.]{1,16}",\s*'
    rb'"checkpoint_id": "(?:[^"\\\x00-\x1f]|\\.){0,1024}",\s*"sequence": (0|[1-9][0-9]{0,17}),')
_PEEK_BYTES = 4096


def committed_sequences(parent: str) -> list[int]:
    """The sequence number of every committed checkpoint in ``parent``, each read from the first
    few KiB of its manifest (a full parse only where a manifest does not begin as distckpt writes
    it). Called by :func:`allocate` on rank 0 under the folder lock; local. Puts back a checkpoint
    stranded by an interrupted overwrite first, as :func:`list_checkpoints` does.

    A directory without a manifest, or whose manifest cannot be read or parsed, has none. A
    manifest damaged after its first bytes still gives its number: the next sequence only
    needs to be above every committed one, so counting it is harmless, and a save no longer
    parses every manifest of the folder (each can be megabytes at scale).
    """
    found: list[int] = []
    for manifest, peeked in _peeked(parent):
        if peeked is not None:
            found.append(peeked)
            continue
        loaded = _loaded(manifest)
        if loaded is not None:
            found.append(loaded.sequence)
    return found


def _peeked(parent: str) -> list[tuple[str, int | None]]:
    """``(manifest path, its sequence read from its first bytes, or None)`` for each directory of
    ``parent`` that may be a committed checkpoint (not hidden, not a symlink, with a manifest
    file that can be opened), after putting back a stranded checkpoint. Local."""
    out: list[tuple[str, int | None]] = []
    for path, problem in _directories(parent, include_hidden=False, restore=True):
        if problem is not None:
            continue
        manifest = os.path.join(path, MANIFEST_NAME)
        try:
            match = _SEQUENCE_AT_START.match(storage.read_prefix(manifest, 0, _PEEK_BYTES))
        except (OSError, CheckpointError):
            continue  # no readable manifest: not committed
        out.append((manifest, None if match is None else int(match.group(1))))
    return out


def _newer(best: tuple[int, str, str] | None, manifest: str) -> tuple[int, str, str] | None:
    """``best`` or ``manifest``'s ``(sequence, timestamp, directory)``, whichever is newer; a
    manifest that cannot be loaded is not a candidate."""
    loaded = _loaded(manifest)
    if loaded is None:
        return best
    key = (loaded.sequence, loaded.timestamp, os.path.dirname(manifest))
    return key if best is None or key > best else best


def _loaded(manifest: str) -> CheckpointManifest | None:
    """The manifest, or ``None`` when it cannot be read or parsed (as :func:`list_checkpoints`:
    one bad directory never blocks a save or a load)."""
    try:
        return CheckpointManifest.load(manifest)
    except Exception:  # any reason at all
        return None


def allocate(checkpoints_dir: str, checkpoint_path: Any, checkpoint_id: Any, overwrite: bool,
             wait_s: float, create: bool = True) -> Allocation | None:
    """Rank 0 only, in the plan phase: final path, id, sequence and a fresh staging directory
    this process owns, as ``{"path", "staging", "checkpoint_id", "sequence", "timestamp"}``.

    All under the folder lock, so two saves (of this job or another job
    sharing the folder) never claim one name or one sequence number: the
    sequence is one past every committed checkpoint and every live save,
    and a default id skips every name that is taken. Raises
    :class:`CheckpointExistsError` for a name that is committed (without
    ``overwrite``) or that a live save is writing, and
    :class:`CheckpointBusyError` when the folder lock is held longer than ``wait_s``.
    ``create=False``: ``None``, and nothing touched, when the target's folder (``checkpoints_dir``,
    or the parent of ``checkpoint_path``) does not exist yet (the plan phase's first-round guess,
    made before the call's arguments are compared).
    """
    if checkpoint_path is not None:
        final = os.path.abspath(os.fspath(checkpoint_path))
        parent = os.path.dirname(final)
    else:
        parent = os.path.abspath(checkpoints_dir)
    if checkpoint_id is not None:
        check_name(str(checkpoint_id), field_name="checkpoint_id")
    if not create and not storage.path_info(parent).dir:
        return None
    folder.prepare_folder(parent)
    with folder.folder_lock(parent, wait_s):
        folder.clean_stale(parent)
        live = folder.live_saves(parent)
        sequence = max([*committed_sequences(parent), *(owner.sequence for owner in live.values())], default=0) + 1
        if checkpoint_path is not None:
            cid = str(checkpoint_id) if checkpoint_id is not None else os.path.basename(final)
        elif checkpoint_id is not None:
            cid = str(checkpoint_id)
            final = os.path.join(parent, f"checkpoint-{cid}")
        else:  # the default id: a free name, never one that is taken
            sequence = folder.first_free(parent, sequence, lambda n: f"checkpoint-{n}", set(live))
            cid = str(sequence)
            final = os.path.join(parent, f"checkpoint-{cid}")
        check_name(os.path.basename(final), field_name="checkpoint_path")
        check_name(cid, field_name="checkpoint_id")
        owner = live.get(os.path.basename(final))
        if owner is not None:
            raise CheckpointExistsError(
                f"{final}: another save ({owner.holder}) is writing this checkpoint right now; "
                "pass another checkpoint_id or wait for it"
            )
        if storage.path_info(final).exists and not overwrite:
            raise CheckpointExistsError(
                f"{final}: a checkpoint already exists there; pass overwrite=True or another checkpoint_id"
            )
        staging = folder.create_staging(final, uuid.uuid4().hex[:12], sequence)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {"path": final, "staging": staging, "checkpoint_id": cid, "sequence": sequence, "timestamp": stamp}


def retain(checkpoints_dir: str, committed: str, keep_last: int | None) -> None:
    """Rank 0, after a commit: keep the newest ``keep_last`` committed checkpoints of
    ``checkpoints_dir`` (only when ``committed`` lies directly in it); a failed delete only warns."""
    parent = os.path.abspath(checkpoints_dir)
    if keep_last is None or os.path.dirname(os.path.abspath(committed)) != parent:
        return
    entries = [e for e in list_checkpoints(parent) if e.committed]
    for entry in entries[: max(0, len(entries) - keep_last)]:
        try:
            storage.remove_checkpoint(entry.path)
        except OSError as exc:
            log.warning("distckpt: retention could not remove %s: %s", entry.path, exc)
