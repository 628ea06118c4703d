"""A folder of checkpoints shared by saves: staging, commit and cleanup (the storage layer's mechanics).

Called on rank 0 by the save phases (:mod:`distckpt.saving`: commit), the
facade and the asynchronous staging (discarding a failed save's staging), the
series (:mod:`distckpt.series`: allocating a save, listing, retention), and the
CLI. Naming, commit and cleanup run under the folder lock
(:mod:`distckpt.locks`); a staging directory is removed only once the process
that owns it is gone; ``overwrite=True`` swaps old and new in one step where
the OS can, and otherwise leaves the old checkpoint restorable. Every file
system call goes through :mod:`distckpt.storage`. Nothing here is collective.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable

from . import locks, storage
from .errors import CheckpointBusyError, CheckpointExistsError, IntegrityError, ManifestError
from .manifest import MANIFEST_NAME, CheckpointManifest
from .storage import fsync_dir, require_real_dir, safe_join, staging_prefix

__all__ = [
    "clean_stale",
    "commit_directory",
    "create_staging",
    "discard_staging",
    "first_free",
    "folder_lock",
    "live_saves",
    "prepare_folder",
    "restore_stranded",
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
    storage.make_dirs(parent)
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
        storage.make_dir(path)
        try:
            locks.claim(path, sequence)
        except BaseException:
            storage.remove_tree(path, ignore_errors=True)
            raise
    return path


def discard_staging(staging: str) -> None:
    """Remove this process's staging directory after a failed save and drop its owner lock."""
    try:
        storage.remove_tree(staging, ignore_errors=True)
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
    while name_of(n) in taken or storage.path_info(os.path.join(parent, name_of(n))).exists:
        n += 1
    return n


def _is_complete(path: str) -> bool:
    """Whether ``path`` holds a readable manifest and every file it lists, at the listed size."""
    try:
        manifest = CheckpointManifest.load(os.path.join(path, MANIFEST_NAME))
        for comp in manifest.components.values():
            for f in comp.files:
                if storage.regular_file_size(safe_join(path, f.path)) != f.size_bytes:
                    return False
    except (OSError, ManifestError, IntegrityError):
        return False
    return True


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
    info = storage.path_info(parent)
    if not info.dir or info.link:
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
                    storage.rename(path, target)
                    doomed.append((path, target))
            except OSError as exc:
                log.warning("distckpt: could not remove stale %s: %s", path, exc)
    removed: list[str] = []
    for found, target in doomed:
        try:
            storage.remove_entry(target)
            removed.append(found)
        except OSError as exc:
            log.warning("distckpt: could not remove stale %s: %s", target, exc)
    return removed


def _restore(replaced: str, final: str) -> bool:
    """Put an interrupted overwrite's old checkpoint back under its name, if free and complete."""
    if storage.path_info(final).exists or storage.path_info(replaced).link or not _is_complete(replaced):
        return False
    storage.rename(replaced, final)
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
                and not storage.path_info(os.path.join(parent, k[1])).exists]
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
            storage.remove_file(os.path.join(staging, locks.OWNER_FILE), missing_ok=True)
            if not storage.path_info(final).exists:
                _rename_new(staging, final)
            elif not overwrite:
                raise _exists(final)
            elif locks.rename_exchange(staging, final):
                old = staging
            else:
                old = os.path.join(parent, f".{os.path.basename(final)}{_REPLACED}{uuid.uuid4().hex[:12]}")
                storage.rename(final, old)
                try:
                    storage.rename(staging, final)
                except BaseException:
                    storage.rename(old, final)
                    raise
            fsync_dir(parent)
    finally:
        locks.release(staging)
    if old is not None:  # the replaced checkpoint, out of sight: its removal may fail harmlessly
        try:
            storage.remove_entry(old)
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
    storage.rename(staging, final)  # no RENAME_NOREPLACE here: the folder lock and the lexists check guard it


def _listdir(path: str) -> list[str]:
    return storage.list_names(path)  # [] when it cannot be listed
