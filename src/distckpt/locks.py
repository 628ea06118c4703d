"""Locks and atomic renames for a folder of checkpoints (part of the storage layer).

Two saves, of one job or of two jobs sharing an ``output_dir``, meet only in
the folder that holds their checkpoints. They stay out of each other's way
with two kinds of ``flock``:

* the **folder lock**: an exclusive ``flock`` on the folder itself, held for
  milliseconds around "decide a name and create its staging directory",
  "rename staging into place" and "clean up leftovers". Within one process it
  is re-entrant for the thread that holds it (a listing inside a locked
  section does not wait for itself) and exclusive between threads.
* the **owner lock**: a lock file inside every staging directory, ``flock``ed
  by the saving process from creation until commit or abort. A staging
  directory whose owner lock can be taken belongs to a process that is gone.

Where the file system cannot lock directories (NFS emulates ``flock`` with
byte-range locks, which need a writable file) the folder lock falls back to a
lock file in the folder. Where it cannot lock at all, liveness is "unknown"
and nothing is removed.

Nothing here is collective; the folder's staging and commit
(:mod:`distckpt.folder`) and the series' rank 0 call it. It reaches the disk
only through :mod:`distckpt.storage`'s primitives (descriptors, ``flock``,
``renameat2``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import storage
from .errors import CheckpointBusyError

__all__ = [
    "FOLDER_LOCK_FILE",
    "OWNER_FILE",
    "Owner",
    "claim",
    "folder_lock",
    "owns",
    "probe",
    "release",
    "rename_exchange",
    "rename_noreplace",
]

log = logging.getLogger("distckpt")

#: The owner lock inside a staging directory (removed just before the commit rename).
OWNER_FILE = ".distckpt-owner.lock"
#: The folder lock file, only where the folder itself cannot be locked.
FOLDER_LOCK_FILE = ".distckpt.lock"
_OWNER_MAX_BYTES = 4096


# ------------------------------------------------------------------ atomic renames (storage's renameat2)

def rename_exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux ``RENAME_EXCHANGE``); False where unsupported."""
    return storage.rename_exchange(a, b)


def rename_noreplace(old: str, new: str) -> bool:
    """Rename only if ``new`` does not exist (``RENAME_NOREPLACE``); False where unsupported."""
    return storage.rename_noreplace(old, new)


# ---------------------------------------------------------------- folder lock

class _Held:
    """One folder's lock in this process: a re-entrant thread lock plus the flock'ed descriptor."""

    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd = -1


_FOLDERS: dict[tuple[int, int], _Held] = {}
_FOLDERS_GUARD = threading.Lock()
_WARNED: set[str] = set()


def _flock_until(fd: int, deadline: float) -> bool | None:
    delay = 0.002
    while True:
        got = storage.try_flock(fd)
        if got is not False or time.monotonic() >= deadline:
            return got
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def _lock_folder_fd(parent: str, deadline: float) -> int:
    """An open descriptor holding the exclusive folder lock (-1 where nothing can lock)."""
    fd = storage.open_dir_fd(parent)
    got = _flock_until(fd, deadline)
    if got is None:  # the directory cannot be flock'ed here: a lock file can
        storage.close_fd(fd)
        fd = storage.open_lock_file(os.path.join(parent, FOLDER_LOCK_FILE), create=True)
        got = _flock_until(fd, deadline)
    if got is None:
        storage.close_fd(fd)
        if parent not in _WARNED:  # once per folder, not once per save
            _WARNED.add(parent)
            log.warning("distckpt: %s cannot be locked on this file system; concurrent saves into it "
                        "are not protected and leftover staging directories are kept", parent)
        return -1
    if not got:
        storage.close_fd(fd)
        raise CheckpointBusyError(
            f"{parent}: another process held this checkpoints folder's lock for longer than allowed; "
            "is a save of another job stuck there?"
        )
    return fd


@contextlib.contextmanager
def folder_lock(parent: str, wait_s: float = 30.0) -> Iterator[None]:
    """Hold the exclusive lock of the checkpoints folder ``parent`` (which must exist).

    Waits up to ``wait_s`` seconds, then raises :class:`CheckpointBusyError`
    (``wait_s=0``: one try). Re-entrant within the holding thread.
    """
    key = storage.file_identity(parent)
    with _FOLDERS_GUARD:
        held = _FOLDERS.setdefault(key, _Held())
    deadline = time.monotonic() + max(0.0, wait_s)
    acquired = held.thread_lock.acquire(timeout=wait_s) if wait_s > 0 else held.thread_lock.acquire(blocking=False)
    if not acquired:
        raise CheckpointBusyError(f"{parent}: another save in this process holds this checkpoints folder's lock")
    try:
        if held.depth == 0:
            held.fd = _lock_folder_fd(parent, deadline)
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd >= 0:
                storage.close_fd(held.fd)
                held.fd = -1
    finally:
        held.thread_lock.release()


# ----------------------------------------------------------------- owner lock

@dataclass(frozen=True)
class Owner:
    """What a staging directory's owner lock says: whether its save is alive, and what it reserved."""

    state: str  # "live", "stale" or "unknown"
    sequence: int
    holder: str

    def __post_init__(self) -> None:
        if self.state not in ("live", "stale", "unknown"):
            raise ValueError(f"Owner.state: {self.state!r}")


_OWNED: dict[str, int] = {}
_OWNED_GUARD = threading.Lock()


def claim(staging: str, sequence: int) -> None:
    """Create and flock the owner lock of a fresh staging directory; held until :func:`release`.

    Called by the process that created ``staging``, under the folder lock.
    """
    fd = storage.create_exclusive_fd(os.path.join(staging, OWNER_FILE))
    try:
        if storage.try_flock(fd) is False:
            raise OSError(errno.EAGAIN, "owner lock of a fresh staging directory is taken", staging)
        info = {"sequence": sequence, "host": socket.gethostname(), "pid": os.getpid()}
        storage.write_all(fd, json.dumps(info).encode())
    except BaseException:
        storage.close_fd(fd)
        raise
    with _OWNED_GUARD:
        _OWNED[os.path.abspath(staging)] = fd


def release(staging: str) -> None:
    """Drop this process's owner lock of ``staging`` (after commit or abort; idempotent)."""
    with _OWNED_GUARD:
        fd = _OWNED.pop(os.path.abspath(staging), -1)
    if fd >= 0:
        storage.close_fd(fd)


def owns(staging: str) -> bool:
    """Whether this process holds the owner lock of ``staging``."""
    with _OWNED_GUARD:
        return os.path.abspath(staging) in _OWNED


def probe(staging: str) -> Owner:
    """Whether the save owning ``staging`` is alive; call under the folder lock.

    No owner file means stale (an owner creates it under the folder lock
    together with the directory, and removes it only under the folder lock
    right before renaming the directory away). When the lock can be taken the
    owner is gone; the lock is dropped again at once.
    """
    if owns(staging):
        return _owner_info(staging, "live")
    try:
        fd = storage.open_lock_file(os.path.join(staging, OWNER_FILE))
    except FileNotFoundError:
        return Owner("stale", 0, "")
    except OSError:
        return Owner("unknown", 0, "")
    try:
        got = storage.try_flock(fd)
        state = "stale" if got else "live" if got is False else "unknown"
        return _owner_info(staging, state, fd)
    finally:
        storage.close_fd(fd)


def _owner_info(staging: str, state: str, fd: int = -1) -> Owner:
    raw = b""
    with contextlib.suppress(OSError):
        if fd < 0:
            opened = storage.open_regular_fd(os.path.join(staging, OWNER_FILE))
            try:
                raw = storage.read_at(opened, _OWNER_MAX_BYTES, 0)
            finally:
                storage.close_fd(opened)
        else:
            raw = storage.read_at(fd, _OWNER_MAX_BYTES, 0)
    try:
        info = json.loads(raw.decode())
        sequence = info["sequence"] if type(info.get("sequence")) is int else 0
        holder = f"host {str(info.get('host'))[:100]}, pid {int(info.get('pid'))}"
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError):
        sequence, holder = 0, "an unknown process"
    return Owner(state, sequence, holder)
