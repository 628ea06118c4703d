"""The series: a folder of checkpoints shared by saves (part of the storage layer).

Two halves. The folder's mechanics: staging, commit and cleanup, re-exported
by :mod:`distckpt.storage` where callers (the save phases, the CLI) use them.
Naming, commit and cleanup run under the folder lock (:mod:`distckpt.locks`);
a staging directory is removed only once the process that owns it is gone;
``overwrite=True`` swaps old and new in one step where the OS can, and
otherwise leaves the old checkpoint restorable. And the series' rules, called
by the coordinator's facade and save phases on rank 0: which checkpoint is the
latest (:func:`latest_committed`), the path, id and sequence number of the next
save (:func:`allocate`), and retention (:func:`retain`). Nothing here is
collective: rank 0 (or the CLI) calls it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Callable
from typing import Any

from . import locks, storage
from .errors import CheckpointBusyError, CheckpointExistsError, IntegrityError, ManifestError
from .manifest import MANIFEST_NAME, CheckpointManifest
from .names import check_name
from .storage import fsync_dir, require_real_dir, safe_join, staging_prefix

__all__ = [
    "Allocation",
    "allocate",
    "clean_stale",
    "commit_directory",
    "create_staging",
    "discard_staging",
    "first_free",
    "folder_lock",
    "latest_committed",
    "live_saves",
    "prepare_folder",
    "restore_stranded",
    "retain",
]

log = logging.getLogger("distckpt")

#: Hidden name parts: a save in progress, a checkpoint being deleted (retention), and the old
#: checkpoint of an ``overwrite=True`` commit that could not swap in one step.
_STAGING, _TRASH, _REPLACED = ".staging-", ".trash-", ".replaced-"
_LOCK_WAIT_S = 30.0


def _hidden_kind(name: str) -> tuple[str, str] | None:
    """``(kind, final name)`` of a hidden staging/trash/replaced entry, or None."""
    if not name.startswith("."):
        return None
    for kind in (_STAGING, _TRASH, _REPLACED):
        base, sep, nonce = name[1:].rpartition(kind)
        if sep and base and nonce:
            return kind, base
    return None


def prepare_folder(parent: str) -> None:
    """Create a checkpoints folder (and its parents) if needed; refuse a symlink or a file."""
    os.makedirs(parent, exist_ok=True)
    require_real_dir(parent, "checkpoint parent directory")


folder_lock = locks.folder_lock


def create_staging(final: str, nonce: str, sequence: int = 0, wait_s: float = _LOCK_WAIT_S) -> str:
    """Create and own the staging directory of ``final`` (and the parents); return its path.

    Under the folder lock: the directory and its owner lock (which records
    ``sequence``) appear together, so no cleaner ever sees it unowned. The
    owner lock is held until :func:`commit_directory` or :func:`discard_staging`.
    """
    parent = os.path.dirname(os.path.abspath(final))
    prepare_folder(parent)
    path = os.path.join(parent, staging_prefix(final) + nonce)
    with locks.folder_lock(parent, wait_s):
        os.mkdir(path, 0o755)
        try:
            locks.claim(path, sequence)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    return path


def discard_staging(staging: str) -> None:
    """Remove this process's staging directory after a failed save and drop its owner lock."""
    try:
        shutil.rmtree(staging, ignore_errors=True)
    finally:
        locks.release(staging)


def live_saves(parent: str) -> dict[str, locks.Owner]:
    """Final names that saves in progress in ``parent`` reserved: ``{name: owner}``. Under the folder lock."""
    out: dict[str, locks.Owner] = {}
    for name in _listdir(parent):
        kind = _hidden_kind(name)
        if kind is None or kind[0] != _STAGING:
            continue
        owner = locks.probe(os.path.join(parent, name))
        if owner.state != "stale":
            out[kind[1]] = owner
    return out


def first_free(parent: str, start: int, name_of: Callable[[int], str], taken: set[str]) -> int:
    """The first ``n >= start`` whose ``name_of(n)`` has no entry in ``parent`` and is not in ``taken``.

    Rank 0's default checkpoint id, under the folder lock.
    """
    n = start
    while name_of(n) in taken or os.path.lexists(os.path.join(parent, name_of(n))):
        n += 1
    return n


def _is_complete(path: str) -> bool:
    """Whether ``path`` holds a readable manifest and every file it lists, at the listed size."""
    try:
        manifest = CheckpointManifest.load(os.path.join(path, MANIFEST_NAME))
        for comp in manifest.components.values():
            for f in comp.files:
                st = os.lstat(safe_join(path, f.path))
                if not stat.S_ISREG(st.st_mode) or st.st_size != f.size_bytes:
                    return False
    except (OSError, ManifestError, IntegrityError):
        return False
    return True


def _remove_entry(path: str) -> None:
    """Delete a file, link or tree; one that is already gone (another cleaner) is fine."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def clean_stale(parent: str, keep: str | None = None, wait_s: float = _LOCK_WAIT_S) -> list[str]:
    """Tidy ``parent``; return what was removed (by the names found).

    Removes the staging directories of saves that are gone (their owner lock
    can be taken) and retention's trash; never a staging directory a live save
    owns. The old checkpoint left behind by an overwrite interrupted between
    its two renames is *restored* to its name when that name is free and it is
    complete (else removed). Deciding and renaming out of sight happen under the
    folder lock; the deleting itself (seconds for a large tree) happens after it
    is released, so other saves never wait for it. Called by rank 0 at the
    start of every save. ``keep`` is a staging directory that must survive.
    """
    if not os.path.isdir(parent) or os.path.islink(parent):
        return []
    doomed: list[tuple[str, str]] = []  # (name found, name to delete)
    with locks.folder_lock(parent, wait_s):
        for name in _listdir(parent):
            kind = _hidden_kind(name)
            path = os.path.join(parent, name)
            if kind is None or (keep is not None and os.path.abspath(path) == os.path.abspath(keep)):
                continue
            if kind[0] == _STAGING and locks.probe(path).state != "stale":
                continue
            try:
                if kind[0] == _REPLACED and _restore(path, os.path.join(parent, kind[1])):
                    continue
                if kind[0] == _TRASH:
                    doomed.append((path, path))
                else:  # out of sight, and this cleaner's alone, in one step
                    target = os.path.join(parent, f".{kind[1]}{_TRASH}{uuid.uuid4().hex[:12]}")
                    os.rename(path, target)
                    doomed.append((path, target))
            except OSError as exc:
                log.warning("distckpt: could not remove stale %s: %s", path, exc)
    removed: list[str] = []
    for found, target in doomed:
        try:
            _remove_entry(target)
            removed.append(found)
        except OSError as exc:
            log.warning("distckpt: could not remove stale %s: %s", target, exc)
    return removed


def _restore(replaced: str, final: str) -> bool:
    """Put an interrupted overwrite's old checkpoint back under its name, if free and complete."""
    if os.path.lexists(final) or os.path.islink(replaced) or not _is_complete(replaced):
        return False
    os.rename(replaced, final)
    fsync_dir(os.path.dirname(final))
    log.warning("distckpt: restored %s from %s (an overwrite was interrupted before the new "
                "checkpoint was in place)", final, os.path.basename(replaced))
    return True


def restore_stranded(parent: str) -> None:
    """Best effort, never waiting: restore old checkpoints stranded by an interrupted overwrite.

    Called by every listing, so "latest" and ``distckpt ls`` find the old
    checkpoint under its name. Skipped while another process holds the folder
    lock (an overwrite may be between its renames) or where the folder is read-only.
    """
    stranded = [n for n in _listdir(parent) if (k := _hidden_kind(n)) and k[0] == _REPLACED
                and not os.path.lexists(os.path.join(parent, k[1]))]
    if not stranded:
        return
    try:
        with locks.folder_lock(parent, 0):
            for name in stranded:
                kind = _hidden_kind(name)
                assert kind is not None
                _restore(os.path.join(parent, name), os.path.join(parent, kind[1]))
    except (OSError, CheckpointBusyError) as exc:
        log.debug("distckpt: not restoring in %s now: %s", parent, exc)


def commit_directory(staging: str, final: str, overwrite: bool, wait_s: float = _LOCK_WAIT_S) -> None:
    """Make a complete staging directory the committed checkpoint ``final``; fsync the parent.

    Under the folder lock, after removing the owner lock file. Raises
    :class:`CheckpointExistsError` if ``final`` exists and ``overwrite`` is
    false (``RENAME_NOREPLACE`` where the OS has it). With ``overwrite`` the
    new directory and the old one swap names in one step
    (``renameat2(RENAME_EXCHANGE)``), so the name always holds a committed
    checkpoint; the old one is then deleted. Without that call the old one is
    first renamed to ``.<name>.replaced-<nonce>``: a failure before the new one
    is in place renames it back, and a crash leaves it for the next listing or
    save to restore. The owner lock is released in every case.
    """
    parent = os.path.dirname(os.path.abspath(final))
    old: str | None = None
    try:
        with locks.folder_lock(parent, wait_s):
            require_real_dir(staging, "staging directory")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(staging, locks.OWNER_FILE))
            if not os.path.lexists(final):
                _rename_new(staging, final)
            elif not overwrite:
                raise _exists(final)
            elif locks.rename_exchange(staging, final):
                old = staging
            else:
                old = os.path.join(parent, f".{os.path.basename(final)}{_REPLACED}{uuid.uuid4().hex[:12]}")
                os.rename(final, old)
                try:
                    os.rename(staging, final)
                except BaseException:
                    os.rename(old, final)
                    raise
            fsync_dir(parent)
    finally:
        locks.release(staging)
    if old is not None:  # the replaced checkpoint, out of sight: its removal may fail harmlessly
        try:
            _remove_entry(old)
        except OSError as exc:
            log.warning("distckpt: could not remove the replaced checkpoint %s: %s", old, exc)


def _exists(final: str) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{final}: a checkpoint already exists there; pass overwrite=True or another checkpoint_id"
    )


def _rename_new(staging: str, final: str) -> None:
    try:
        if locks.rename_noreplace(staging, final):
            return
    except FileExistsError:
        raise _exists(final) from None
    os.rename(staging, final)  # no RENAME_NOREPLACE here: the folder lock and the lexists check guard it


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


# ---------------------------------------------------------------- the series' rules


Allocation = dict[str, Any]


def latest_committed(parent: str) -> str | None:
    """Path of the newest committed checkpoint in ``parent`` (highest sequence), or ``None``. Local."""
    committed = [e for e in storage.list_checkpoints(parent) if e.committed]
    return committed[-1].path if committed else None


def allocate(checkpoints_dir: str, checkpoint_path: Any, checkpoint_id: Any, overwrite: bool,
             wait_s: float) -> Allocation:
    """Rank 0 only, in the plan phase: final path, id, sequence and a fresh staging directory
    this process owns, as ``{"path", "staging", "checkpoint_id", "sequence", "timestamp"}``.

    All under the folder lock, so two saves (of this job or another job
    sharing the folder) never claim one name or one sequence number: the
    sequence is one past every committed checkpoint and every live save,
    and a default id skips every name that is taken. Raises
    :class:`CheckpointExistsError` for a name that is committed (without
    ``overwrite``) or that a live save is writing, and
    :class:`CheckpointBusyError` when the folder lock is held longer than ``wait_s``.
    """
    if checkpoint_path is not None:
        final = os.path.abspath(os.fspath(checkpoint_path))
        parent = os.path.dirname(final)
    else:
        parent = os.path.abspath(checkpoints_dir)
    if checkpoint_id is not None:
        check_name(str(checkpoint_id), field_name="checkpoint_id")
    prepare_folder(parent)
    with folder_lock(parent, wait_s):
        clean_stale(parent)
        live = live_saves(parent)
        sequence = max([e.manifest.sequence for e in storage.list_checkpoints(parent) if e.manifest]
                       + [owner.sequence for owner in live.values()], default=0) + 1
        if checkpoint_path is not None:
            cid = str(checkpoint_id) if checkpoint_id is not None else os.path.basename(final)
        elif checkpoint_id is not None:
            cid = str(checkpoint_id)
            final = os.path.join(parent, f"checkpoint-{cid}")
        else:  # the default id: a free name, never one that is taken
            sequence = first_free(parent, sequence, lambda n: f"checkpoint-{n}", set(live))
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
        if os.path.lexists(final) and not overwrite:
            raise CheckpointExistsError(
                f"{final}: a checkpoint already exists there; pass overwrite=True or another checkpoint_id"
            )
        staging = create_staging(final, uuid.uuid4().hex[:12], sequence)
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {"path": final, "staging": staging, "checkpoint_id": cid, "sequence": sequence, "timestamp": stamp}


def retain(checkpoints_dir: str, committed: str, keep_last: int | None) -> None:
    """Rank 0, after a commit: keep the newest ``keep_last`` committed checkpoints of
    ``checkpoints_dir`` (only when ``committed`` lies directly in it); a failed delete only warns."""
    parent = os.path.abspath(checkpoints_dir)
    if keep_last is None or os.path.dirname(os.path.abspath(committed)) != parent:
        return
    entries = [e for e in storage.list_checkpoints(parent) if e.committed]
    for entry in entries[: max(0, len(entries) - keep_last)]:
        try:
            storage.remove_checkpoint(entry.path)
        except OSError as exc:
            log.warning("distckpt: retention could not remove %s: %s", entry.path, exc)
