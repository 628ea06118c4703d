"""Storage: the only module that writes to disk.

Every write lands first in a staging directory or a temporary file beside its
final name, is hashed while written, fsynced, and made visible by a rename
followed by an fsync of the parent directory. Reads refuse symlinks and
anything but regular files (a FIFO never blocks), and verify size and checksum
before anything is parsed. A folder of checkpoints is shared safely between
saves, of one job or several: naming, commit and cleanup run under the folder
lock, and a staging directory is removed only once its owner is gone
(:mod:`distckpt.series`, :mod:`distckpt.locks`: this layer's other modules).
Nothing here is collective; the coordinator decides which rank calls what.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import locks
from .errors import IntegrityError, ManifestError
from .hashing import (
    CHECKSUM_ALGORITHM,
    PipelinedHasher,
    checksum_of,
    checksum_of_chunks,
    new_hasher,
)
from .layout import check_relpath
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, CheckpointManifest

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CheckpointEntry",
    "PipelinedHasher",
    "Run",
    "VerifiedReader",
    "atomic_write_bytes",
    "checksum_of",
    "checksum_of_chunks",
    "clean_stale",
    "commit_directory",
    "create_staging",
    "discard_staging",
    "first_free",
    "folder_lock",
    "fsync_dir",
    "list_checkpoints",
    "live_saves",
    "make_component_dir",
    "new_hasher",
    "open_regular_file",
    "prepare_folder",
    "read_manifest_bytes",
    "read_prefix",
    "read_verified",
    "remove_checkpoint",
    "require_real_dir",
    "restore_stranded",
    "safe_join",
    "staging_prefix",
    "unlisted_files",
    "write_file",
    "write_runs",
]

log = logging.getLogger("distckpt")

_BOUNCE_BYTES = 4 * 1024 * 1024  # bytes per private write buffer
_BOUNCE_COUNT = 3  # buffers per writing thread: one being filled and hashed, up to two being written
_READ_PIECE = 16 * 1024 * 1024  # hashed while still in cache
_IOV_BATCH = 512  # buffers per readv (IOV_MAX is 1024 on Linux)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _writev_all(fd: int, views: list[memoryview]) -> None:
    """Write ``views`` in order with as few ``writev`` calls as short writes allow."""
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + _IOV_BATCH])
        while n:
            if n >= len(views[i]):
                n -= len(views[i])
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


class _Bounce:
    """A few private buffers a writing thread copies file bytes into (kept for its next file).

    The copy is what makes the checksum exact: the hasher and ``writev`` read
    the same private bytes, so a tensor changed by another thread during a
    save changes neither. ``free[i]`` is set while the write worker is not
    reading buffer ``i``.
    """

    def __init__(self) -> None:
        self.buffers: list[memoryview] = []
        self.tensors: list[torch.Tensor] = []  # the same memory, for torch.cat(..., out=)
        self.free: list[threading.Event] = []

    def buffer(self, index: int) -> memoryview:
        while len(self.buffers) <= index:
            import torch  # here, not at the top: `distckpt ls/inspect/verify` never load torch
            tensor = torch.empty(_BOUNCE_BYTES, dtype=torch.uint8)  # never zero-filled
            array: Any = tensor.numpy()
            self.tensors.append(tensor)
            self.buffers.append(memoryview(array).cast("B"))
            event = threading.Event()
            event.set()
            self.free.append(event)
        return self.buffers[index]


_bounce_local = threading.local()


def _bounce() -> _Bounce:
    ring: _Bounce | None = getattr(_bounce_local, "ring", None)
    if ring is None:
        ring = _bounce_local.ring = _Bounce()
    return ring


class _RunWriter:
    """Writes one file from ``(view, owned)`` runs, in order: hashes in the caller's thread,
    ``writev`` in a worker thread meanwhile (a file of one buffer is written here, without a thread).

    A view that is not ``owned`` is first copied into the thread's bounce buffers
    and that copy is hashed and written (the checksum is of the very bytes handed to
    the kernel even if another thread changes the tensor meanwhile). An ``owned``
    view is a private copy nothing else changes: hashed and written as it is, many
    in one ``writev``. At most a few hand-overs are in flight (memory stays bounded).
    A write error is raised by the next call.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.ring = _bounce()
        self.hasher = new_hasher(CHECKSUM_ALGORITHM)
        self.index = 0
        self.fill = 0
        self.size = 0
        self._owned: list[memoryview] = []
        self._owned_bytes = 0
        self._queue: queue.Queue[tuple[int, int] | list[memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def add_run(self, tensors: list[torch.Tensor], nbytes: int) -> None:
        """Copy small contiguous tensors of one dtype (``nbytes`` together, at most one buffer)
        back to back into the bounce buffer with one ``torch.cat``: one copy for the run."""
        dtype = tensors[0].dtype
        itemsize = tensors[0].element_size()
        if self._owned:
            self._release_owned()
        if self.fill + nbytes > _BOUNCE_BYTES or self.fill % itemsize:
            self._flush()
        self.ring.buffer(self.index)
        target = self.ring.tensors[self.index][self.fill:self.fill + nbytes].view(dtype)
        import torch  # loaded by then: the caller's tensors are torch's

        torch.cat([t if t.dim() == 1 else t.view(-1) for t in tensors], out=target)
        self.fill += nbytes
        self.size += nbytes
        if self.fill == _BOUNCE_BYTES:
            self._flush()

    def _release_owned(self) -> None:
        """Before bounce-buffered bytes: owned views waiting for their hand-over go first."""
        if self._queue is None and self._owned_bytes + self.fill <= _BOUNCE_BYTES:
            # a small file so far (a header): into the bounce buffer, no thread yet
            pending, self._owned, self._owned_bytes = self._owned, [], 0
            for piece in pending:
                self._copy(piece)
        else:
            self._submit_owned()

    def add(self, view: memoryview, owned: bool) -> None:
        if owned:
            if self.fill:
                self._flush()
            for start in range(0, len(view), _BOUNCE_BYTES):
                piece = view[start:start + _BOUNCE_BYTES] if len(view) > _BOUNCE_BYTES else view
                self._owned.append(piece)
                self._owned_bytes += len(piece)
                if len(self._owned) >= _IOV_BATCH or self._owned_bytes >= _BOUNCE_BYTES:
                    self._submit_owned()
        else:
            if self._owned:
                self._release_owned()
            self._copy(view)
        self.size += len(view)

    def _copy(self, view: memoryview) -> None:
        start = 0
        while start < len(view):
            target = self.ring.buffer(self.index)
            n = min(len(view) - start, _BOUNCE_BYTES - self.fill)
            target[self.fill:self.fill + n] = view[start:start + n]
            self.fill += n
            start += n
            if self.fill == _BOUNCE_BYTES:
                self._flush()

    def _submit_owned(self) -> None:
        batch, self._owned, self._owned_bytes = self._owned, [], 0
        for piece in batch:
            self.hasher.update(piece)
        self._submit(batch)

    def _submit(self, job: tuple[int, int] | list[memoryview]) -> None:
        if self._queue is None:
            self._queue = queue.Queue(maxsize=_BOUNCE_COUNT + 1)
            self._thread = threading.Thread(target=self._work, name="distckpt-write", daemon=True)
            self._thread.start()
        self._queue.put(job)
        if self._error is not None:
            raise self._error

    def _flush(self) -> None:
        """Hash the filled bounce buffer and hand it to the worker; wait until the next one is free."""
        if not self.fill:
            return
        index, length = self.index, self.fill
        self.hasher.update(self.ring.buffer(index)[:length])
        self.ring.free[index].clear()
        self._submit((index, length))
        self.index = (index + 1) % _BOUNCE_COUNT
        self.fill = 0
        self.ring.buffer(self.index)
        self.ring.free[self.index].wait()  # the worker is done writing the buffer filled next
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        assert self._queue is not None
        while (job := self._queue.get()) is not None:
            try:
                if self._error is None:
                    if isinstance(job, tuple):
                        _writev_all(self.fd, [self.ring.buffers[job[0]][:job[1]]])
                    else:
                        _writev_all(self.fd, job)
            except BaseException as exc:  # raised by the caller's next call or finish
                self._error = exc
            finally:
                if isinstance(job, tuple):
                    self.ring.free[job[0]].set()

    def finish(self) -> str:
        """Write what is left, wait for the writer; ``"<algorithm>:<hex>"`` of every byte written."""
        if self._queue is None:  # everything fits one hand-over: write it here, no thread
            data = [self.ring.buffer(self.index)[:self.fill]] if self.fill else self._owned
            for piece in data:
                self.hasher.update(piece)
            _writev_all(self.fd, data)
            self.fill, self._owned = 0, []
        else:
            if self.fill:
                self._flush()
            if self._owned:
                self._submit_owned()
            self.close()
        if self._error is not None:
            raise self._error
        return f"{CHECKSUM_ALGORITHM}:{self.hasher.hexdigest()}"

    def close(self) -> None:
        """Stop the worker once it has written what it was given (idempotent)."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def write_file(path: str, chunks: Iterable[memoryview | bytes], *, private: bool = False) -> tuple[int, str]:
    """Create ``path`` (never overwriting, never following a symlink), write, hash, fsync.

    Called by the CLI and :func:`atomic_write_bytes`; not collective. Every
    byte is first copied into a small private buffer of this thread (a few
    MiB, reused), and that copy is both hashed and written: the checksum is
    exactly that of the bytes handed to the kernel, even when another thread
    changes a tensor during the save. ``private=True`` skips the copy, for
    chunks nothing else can change until this returns (``bytes``, snapshots).
    Returns ``(size, "<algorithm>:<hex>")``. On failure the partial file is
    removed and the ``OSError`` propagates.
    """
    return write_runs(path, ((_as_bytes_view(chunk), private) for chunk in chunks))


def _as_bytes_view(chunk: memoryview | bytes) -> memoryview:
    view = memoryview(chunk)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


#: One item of :func:`write_runs`: ``(bytes, owned)``, or ``(tensors, nbytes)`` for a run of small
#: contiguous CPU tensors of one dtype, at most 4 MiB together, copied into the file back to back.
Run = tuple[memoryview, bool] | tuple[list[Any], int]


def write_runs(path: str, runs: Iterable[Run]) -> tuple[int, str]:
    """:func:`write_file` for the runs of :meth:`distckpt.codec.EncodedState.runs`.

    Called by the save path (writers only); not collective. ``(view, True)``
    is a private copy, hashed and written as it is; ``(view, False)`` is
    copied into this thread's buffers first (see :func:`write_file`), and so
    is ``(tensors, nbytes)``, with one ``torch.cat`` for the whole run: one
    copy, one hash and one write per few MiB, not per tensor. Returns
    ``(size, "<algorithm>:<hex>")``; on failure the partial file is removed
    and the ``OSError`` propagates.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
    writer = _RunWriter(fd)
    try:
        for item, flag in runs:
            if isinstance(item, list):
                writer.add_run(item, int(flag))
                continue
            view = item
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            writer.add(view, bool(flag))
        checksum = writer.finish()
        os.fsync(fd)
    except BaseException:
        writer.close()
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return writer.size, checksum


def _open_regular(path: str, what: str) -> int:
    """Open a checkpoint file for reading: never a symlink, never anything but a regular file.

    A FIFO, socket or device is refused without blocking (see
    :func:`~distckpt.locks.open_regular_fd`). Raises :class:`IntegrityError`
    naming ``path``; other ``OSError`` propagate.
    """
    try:
        return locks.open_regular_fd(path)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: {what} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise IntegrityError(f"{path}: {what} is a symlink; refusing to follow it") from None
        if exc.errno == errno.EINVAL and exc.strerror == "not a regular file":
            raise IntegrityError(f"{path}: {what} is not a regular file") from None
        raise


def read_prefix(path: str, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of a regular file from ``offset``, unverified (a file's header,
    read by the load path's state check before the file itself). Not collective.

    Raises :class:`IntegrityError` naming ``path`` when it is missing, a symlink
    or not a regular file; other ``OSError`` propagate.
    """
    fd = _open_regular(path, "checkpoint file")
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def open_regular_file(path: str) -> int:
    """A blocking read descriptor of ``path`` if it is a regular file (the CLI's verify).

    Raises ``OSError``: ``ENOENT`` missing, ``ELOOP`` symlink, ``EINVAL`` not a
    regular file (a FIFO never blocks the caller).
    """
    return locks.open_regular_fd(path)


class VerifiedReader:
    """Reads one checkpoint file front to back, checking its size and checksum.

    Called by the load path (not collective). The caller places each stretch
    of the file where it wants it, in file order: :meth:`read_into` reads into
    its own buffers (live tensors), :meth:`read_to` into :attr:`buffer`, a
    scratch buffer of the file's size that is never zero-filled (pages never
    read into cost no memory). Bytes are hashed while still in cache.
    :meth:`finish` reads the rest and raises :class:`IntegrityError` naming the
    file if the checksum differs; so does opening a missing file, a symlink or
    a file of another size. Data placed before :meth:`finish` is unverified.
    """

    def __init__(self, path: str, size: int, checksum: str) -> None:
        self.path = path
        self.size = size
        self.checksum = checksum
        self.position = 0
        self._algorithm = checksum.partition(":")[0]
        try:
            self._hasher = PipelinedHasher(self._algorithm)
        except IntegrityError as exc:
            raise IntegrityError(f"{path}: {exc.message} in the manifest; cannot verify this file") from None
        self._fd = _open_regular(path, "checkpoint file")
        try:
            actual = os.fstat(self._fd).st_size
            if actual != size:
                raise IntegrityError(f"{path}: size is {actual} bytes, the manifest says {size}")
            import torch  # here, not at the top: `distckpt ls/inspect/verify` never load torch
            array: Any = torch.empty(size, dtype=torch.uint8).numpy()
            self.buffer: memoryview = memoryview(array).cast("B")
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> VerifiedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._hasher.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_to(self, offset: int) -> memoryview:
        """Read up to file offset ``offset`` into :attr:`buffer`; returns ``buffer[:offset]``."""
        if offset > self.position:
            self.read_into([self.buffer[self.position:offset]])
        return self.buffer[:offset]

    def read_into(self, views: Iterable[memoryview]) -> None:
        """Read the next ``sum(len(v))`` bytes of the file into ``views``, in order."""
        pending = [v[i:i + _READ_PIECE] for v in views for i in range(0, len(v), _READ_PIECE)]
        i = 0
        while i < len(pending):
            batch: list[memoryview] = []
            total = 0
            for v in pending[i:i + _IOV_BATCH]:
                batch.append(v)
                total += len(v)
                if total >= _READ_PIECE:
                    break
            n = os.readv(self._fd, batch)
            if n == 0:
                raise IntegrityError(f"{self.path}: file shrank while being read")
            self.position += n
            while n:
                v = pending[i]
                if n >= len(v):
                    self._hasher.update(v)
                    n -= len(v)
                    i += 1
                else:
                    self._hasher.update(v[:n])
                    pending[i] = v[n:]
                    n = 0
        if self.position > self.size:
            raise IntegrityError(f"{self.path}: read past the size the manifest gives")

    def finish(self) -> memoryview:
        """Read the rest into :attr:`buffer`, close, and verify; returns :attr:`buffer`."""
        try:
            self.read_to(self.size)
            digest = self._hasher.hexdigest()
        finally:
            self.close()
        if f"{self._algorithm}:{digest}" != self.checksum:
            raise IntegrityError(f"{self.path}: checksum mismatch (file is corrupt or was modified)")
        return self.buffer


def read_verified(path: str, size: int, checksum: str) -> memoryview:
    """Read a whole file, checking its size and checksum against the manifest's.

    Returns a writable buffer (not zero-filled first: a 1 GB file costs one
    read, not a memset plus a read), hashed chunk by chunk while the bytes
    are still in cache. Raises :class:`IntegrityError` naming ``path`` when
    the file is missing, a symlink, of another size, or its checksum differs.
    """
    with VerifiedReader(path, size, checksum) as reader:
        return reader.finish()


def read_manifest_bytes(path: str) -> bytes:
    """Read a manifest file; :class:`ManifestError` naming ``path`` if missing, a symlink or too large."""
    try:
        fd = _open_regular(path, "manifest")
    except IntegrityError as exc:
        raise ManifestError(str(exc)) from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: {size} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_MANIFEST_BYTES:  # grew while being read
                raise ManifestError(f"{path}: larger than the {MAX_MANIFEST_BYTES}-byte limit")
        return b"".join(chunks)
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    write_file(tmp, [data], private=True)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_dir(parent)


def require_real_dir(path: str, what: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` is a directory and not a symlink."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise IntegrityError(f"{path}: {what} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"{path}: {what} is not a directory")


def safe_join(root: str, relpath: str) -> str:
    """Join a manifest path to a checkpoint directory, refusing escapes and symlinked directories."""
    try:
        check_relpath(relpath)
    except ValueError as exc:
        raise IntegrityError(f"{root}: {exc}") from None
    key_dir = os.path.join(root, relpath.split("/")[0])
    if os.path.lexists(key_dir):
        require_real_dir(key_dir, "component directory")
    return os.path.join(root, relpath)


def staging_prefix(final: str) -> str:
    """Name prefix of the staging directories of ``final`` (hidden, beside it)."""
    return f".{os.path.basename(final)}.staging-"


def make_component_dir(staging: str, key: str) -> str:
    """Create (race-free between ranks) and check ``<staging>/<key>``."""
    require_real_dir(staging, "staging directory")
    path = os.path.join(staging, key)
    os.makedirs(path, exist_ok=True)
    require_real_dir(path, "component directory")
    return path


def remove_checkpoint(path: str) -> None:
    """Retire a committed checkpoint: rename it out of sight first, then delete it."""
    parent = os.path.dirname(os.path.abspath(path))
    trash = os.path.join(parent, f".{os.path.basename(path)}.trash-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash)


@dataclass(frozen=True)
class CheckpointEntry:
    """A directory under a checkpoints folder: committed (with manifest) or not (with why)."""

    path: str
    manifest: CheckpointManifest | None
    problem: str | None

    @property
    def committed(self) -> bool:
        return self.manifest is not None


def unlisted_files(root: str, listed: Iterable[str]) -> list[str]:
    """Entries under a checkpoint directory that its manifest does not list (relative paths).

    Looks one level into component directories; ``manifest.json`` counts as listed.
    """
    known = set(listed) | {MANIFEST_NAME}
    key_dirs = {p.split("/", 1)[0] for p in known}
    extra = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name in key_dirs and os.path.islink(full):
            continue  # a listed component's directory: reading it refuses the symlink by name
        if os.path.isdir(full) and not os.path.islink(full):
            extra += [f"{name}/{inner}" for inner in sorted(os.listdir(full)) if f"{name}/{inner}" not in known]
        elif name not in known:
            extra.append(name)
    return extra


def list_checkpoints(parent: str, include_hidden: bool = False, restore: bool = True) -> list[CheckpointEntry]:
    """Every checkpoint directory in ``parent``, committed ones ordered oldest to newest.

    Order is by manifest ``sequence``, then timestamp, then name: never by
    mtime. Directories without a readable manifest come first, with the reason.
    Staging and trash directories are skipped unless ``include_hidden``.
    ``restore`` first puts back an old checkpoint stranded by an interrupted
    overwrite (:func:`restore_stranded`), so it is found under its name.
    """
    if not os.path.isdir(parent):
        return []
    if restore:
        restore_stranded(parent)  # bound at the end of this module (from .series)
    broken: list[CheckpointEntry] = []
    good: list[CheckpointEntry] = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(".") and not include_hidden:
            continue
        if os.path.islink(path):
            broken.append(CheckpointEntry(path, None, "is a symlink"))
            continue
        if not os.path.isdir(path):
            continue
        if name.startswith("."):
            broken.append(CheckpointEntry(path, None, "staging or trash directory (incomplete)"))
            continue
        try:
            good.append(CheckpointEntry(path, CheckpointManifest.load(os.path.join(path, MANIFEST_NAME)), None))
        except ManifestError as exc:
            broken.append(CheckpointEntry(path, None, str(exc)))
        except Exception as exc:  # any reason at all: one bad directory never blocks "latest" or a save
            broken.append(CheckpointEntry(path, None, f"unreadable manifest ({type(exc).__name__}: {exc})"[:500]))
    good.sort(key=lambda e: (e.manifest.sequence, e.manifest.timestamp, e.path) if e.manifest else (0, "", e.path))
    return broken + good


# The folder's staging, commit and cleanup live in .series (part of this layer); callers use them from here.
from .series import (  # noqa: E402
    clean_stale,
    commit_directory,
    create_staging,
    discard_staging,
    first_free,
    folder_lock,
    live_saves,
    prepare_folder,
    restore_stranded,
)

# ============================================================================
# Looking at checkpoints from outside a job: the CLI, verify_checkpoint,
# diff_checkpoints and legacy conversion (added for issue 13 item 5).
#
# Every file-system call of those callers lives here, so that they stay free of
# os.* calls and of torch (``distckpt ls`` / ``inspect`` / ``verify`` start
# without importing it). Opening refuses symlinks and never blocks on a FIFO
# (locks.open_regular_fd, the reader's policy); hashing uses this module's
# new_hasher. Nothing here is collective.
# ============================================================================

_CHECK_CHUNK = 8 * 1024 * 1024  # bytes per read while verifying a file: memory stays flat

import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import BinaryIO  # noqa: E402


@dataclass(frozen=True)
class PathInfo:
    """What is at a path, in the terms of ``os.path``: ``exists`` does not follow a
    symlink (``lexists``), ``dir``, ``file`` and ``size`` do (``isdir``, ``isfile``,
    ``getsize``; ``size`` is 0 unless ``file``)."""

    exists: bool
    link: bool
    dir: bool
    file: bool
    size: int

    def __post_init__(self) -> None:
        if self.size < 0 or (self.size and not self.file):
            raise ValueError(f"PathInfo: size {self.size} for a path that is not a regular file")


def path_info(path: str) -> PathInfo:
    """Describe ``path`` without opening it. Called by the CLI and the legacy reader; never raises."""
    try:
        lst = os.lstat(path)
    except (OSError, ValueError):
        return PathInfo(False, False, False, False, 0)
    st: os.stat_result | None = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            st = None
    is_file = st is not None and stat.S_ISREG(st.st_mode)
    return PathInfo(
        exists=True,
        link=stat.S_ISLNK(lst.st_mode),
        dir=st is not None and stat.S_ISDIR(st.st_mode),
        file=is_file,
        size=st.st_size if st is not None and is_file else 0,
    )


def list_names(path: str) -> list[str]:
    """Sorted names in directory ``path``; ``[]`` when it cannot be listed. Called by the CLI."""
    try:
        return sorted(os.listdir(path))
    except (OSError, ValueError):
        return []


def list_regular_files(path: str) -> list[str]:
    """Sorted names of the regular files directly in ``path`` (symlinks skipped).

    Called by the legacy reader to take its inventory. Raises ``OSError`` when
    ``path`` cannot be listed.
    """
    out = []
    for name in sorted(os.listdir(path)):
        info = path_info(os.path.join(path, name))
        if info.file and not info.link:
            out.append(name)
    return out


@dataclass(frozen=True)
class FileFault:
    """Why a checkpoint file does not match its manifest entry: ``kind`` is ``"missing"``
    (no such file) or ``"bad"`` (anything else); ``message`` says what, without the path."""

    kind: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in ("missing", "bad"):
            raise ValueError(f"FileFault: kind must be 'missing' or 'bad', not {self.kind!r}")


def check_file(
    path: str, size: int, checksum: str, on_bytes: Callable[[int], None] | None = None
) -> FileFault | None:
    """Stream ``path`` through its hash and compare size and checksum with the manifest's.

    Called by :func:`distckpt.verify_checkpoint` and :func:`distckpt.diff_checkpoints`
    (not collective). Reads in chunks of a few MiB, so memory stays flat however
    large the file. ``on_bytes(n)`` is told of every ``n`` bytes accounted for
    (a file of the wrong size counts as its listed size, unread). Returns
    ``None`` when the file matches, else a :class:`FileFault`; never raises for
    a file that is missing, a symlink, not regular, unreadable or damaged.
    """
    algorithm = checksum.partition(":")[0]
    try:
        hasher = new_hasher(algorithm)
    except IntegrityError:
        return FileFault("bad", f"unknown checksum algorithm in manifest ({checksum!r})")
    try:
        fd = open_regular_file(path)  # a FIFO is refused, never waited on
    except FileNotFoundError:
        return FileFault("missing", "listed in the manifest but not on disk")
    except OSError as exc:
        if exc.errno == errno.ELOOP or path_info(path).link:
            return FileFault("bad", "is a symlink (never followed)")
        if exc.errno == errno.EINVAL and exc.strerror == "not a regular file":
            return FileFault("bad", "not a regular file")
        return FileFault("bad", f"cannot be read ({exc.strerror or exc})")
    try:
        actual_size = os.fstat(fd).st_size
        if actual_size != size:
            if on_bytes is not None:
                on_bytes(size)
            return FileFault("bad", f"size is {actual_size} bytes, the manifest says {size}")
        while chunk := os.read(fd, _CHECK_CHUNK):
            hasher.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    except OSError as exc:
        return FileFault("bad", f"cannot be read ({exc.strerror or exc})")
    finally:
        os.close(fd)
    actual = f"{algorithm}:{hasher.hexdigest()}"
    if actual != checksum:
        return FileFault("bad", f"checksum mismatch (manifest {checksum}, file {actual}): corrupt or modified")
    return None


def read_small_file(path: str, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (the original format's JSON manifest).

    Called by legacy conversion. Raises ``OSError`` when ``path`` is missing,
    a symlink, not a regular file or unreadable (a FIFO never blocks), and
    ``ValueError`` when it is larger than ``limit``.
    """
    fd = open_regular_file(path)
    try:
        if os.fstat(fd).st_size > limit:
            raise ValueError(f"larger than {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while being read
                raise ValueError(f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_regular_stream(path: str) -> BinaryIO:
    """A binary file object for reading ``path``, only if it is a regular file and not a symlink.

    Called by the legacy reader (``torch.load`` reads from it). Raises
    ``OSError``: ``ENOENT`` missing, ``ELOOP`` symlink, ``EINVAL`` not a
    regular file (a FIFO never blocks the caller). The caller closes it.
    """
    fd = open_regular_file(path)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def write_through_temp(path: str, fill: Callable[[BinaryIO], None]) -> None:
    """Create or replace ``path`` with what ``fill(file)`` writes, all or nothing.

    Called by ``distckpt convert --to-torch``. The bytes go to a hidden
    temporary file beside ``path``, are fsynced, and replace ``path`` by a
    rename. On any failure the temporary file is removed, ``path`` is left as
    it was, and the exception propagates.
    """
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        fsync_dir(parent)


def discard_stdout() -> None:
    """Point file descriptor 1 at the null device (the CLI, after a broken pipe); never raises."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
