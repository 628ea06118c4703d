"""Storage: the only module that touches the file system.

Every write lands first in a staging directory or a temporary file beside its
final name, is hashed while written, fsynced, and made visible by a rename
followed by an fsync of the parent directory. Reads refuse symlinks and
anything but regular files (a FIFO never blocks), and verify size and checksum
before anything is parsed. A folder of checkpoints is shared safely between
saves, of one job or several: naming, commit and cleanup run under the folder
lock, and a staging directory is removed only once its owner is gone
(:mod:`distckpt.folder`, :mod:`distckpt.locks`; both reach the disk only
through the primitives at the end of this module, which is the one place that
knows POSIX details: the seam a second backend would plug into).
Nothing here is collective; the save and load phases decide which rank calls what.

Called by: the save phases (:mod:`distckpt.saving`: component files, fsyncs),
the load phases (:mod:`distckpt.loading`, :mod:`distckpt.reading`: verified
reads), :mod:`distckpt.folder`, :mod:`distckpt.locks` and
:mod:`distckpt.series` (the folder of checkpoints), the CLI, and
:class:`~distckpt.manifest.CheckpointManifest` (``load``/``save``, bound here:
:func:`read_manifest_file`, :func:`write_manifest_file`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
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

from . import manifest as _manifest
from .errors import IntegrityError, ManifestError
from .hashing import (
    CHECKSUM_ALGORITHM,
    PipelinedHasher,
    checksum_of,
    checksum_of_chunks,
    new_hasher,
)
from .layout import check_relpath
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES

if TYPE_CHECKING:
    import torch

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FileFault",
    "PathInfo",
    "PipelinedHasher",
    "Run",
    "VerifiedReader",
    "atomic_write_bytes",
    "check_file",
    "checksum_of",
    "checksum_of_chunks",
    "close_fd",
    "create_exclusive_fd",
    "discard_stdout",
    "file_identity",
    "fsync_dir",
    "list_dir",
    "list_names",
    "list_regular_files",
    "make_component_dir",
    "make_dir",
    "make_dirs",
    "manifest_file",
    "new_hasher",
    "open_dir_fd",
    "open_lock_file",
    "open_regular_fd",
    "open_regular_file",
    "open_regular_stream",
    "path_info",
    "read_at",
    "read_manifest_bytes",
    "read_manifest_file",
    "read_prefix",
    "read_small_file",
    "read_verified",
    "regular_file_size",
    "remove_checkpoint",
    "remove_entry",
    "remove_file",
    "remove_tree",
    "rename",
    "rename_exchange",
    "rename_noreplace",
    "require_real_dir",
    "safe_join",
    "staging_prefix",
    "try_flock",
    "unlisted_files",
    "write_all",
    "write_file",
    "write_manifest_file",
    "write_runs",
    "write_through_temp",
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
    :func:`open_regular_fd`). Raises :class:`IntegrityError`
    naming ``path``; other ``OSError`` propagate.
    """
    try:
        return open_regular_fd(path)
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
    return open_regular_fd(path)


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


# ============================================================================
# Looking at checkpoints from outside a job: the CLI, verify_checkpoint,
# diff_checkpoints and legacy conversion (added for issue 13 item 5).
#
# Every file-system call of those callers lives here, so that they stay free of
# os.* calls and of torch (``distckpt ls`` / ``inspect`` / ``verify`` start
# without importing it). Opening refuses symlinks and never blocks on a FIFO
# (open_regular_fd, the reader's policy); hashing uses this module's
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


# ------------------------------------------------------------------------------------------------
# File-system primitives for the rest of the library.
#
# Every other module of distckpt (the folder's staging and commit, the locks, the series, the load
# phases, the manifest's load and save) reaches the disk through these functions (and through
# path_info / list_names above), so that this module alone knows POSIX details (flags, flock, renameat2, errno values). Nothing here is
# collective; none of it is on the hot path of writing or reading checkpoint data.
# ------------------------------------------------------------------------------------------------

_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: errno values meaning "this file system cannot do this" (flock, renameat2), not "someone holds it".
_UNSUPPORTED = {errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}


def open_regular_fd(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """Open ``path`` without following a symlink and without blocking, and only if it is a regular file.

    ``O_NONBLOCK`` makes opening a FIFO return at once (instead of waiting for
    a writer forever); the ``fstat`` then refuses it. Raises ``OSError``:
    ``ELOOP`` for a symlink, ``ENOENT`` when missing, ``EINVAL`` for anything
    that is not a regular file (FIFO, socket, device, directory). The returned
    descriptor is blocking again. Callers: every read of a checkpoint file, the locks.
    """
    fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK, mode)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if _O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock_file(path: str, create: bool = False) -> int:
    """Open a lock file for reading and writing (``flock`` needs that on NFS); regular files only,
    never through a symlink, never blocking (see :func:`open_regular_fd`)."""
    return open_regular_fd(path, os.O_RDWR | (os.O_CREAT if create else 0))


def create_exclusive_fd(path: str) -> int:
    """Create ``path`` (never an existing one, never through a symlink) open for reading and writing."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644)


def open_dir_fd(path: str) -> int:
    """A read-only descriptor of the directory ``path`` (never through a symlink), e.g. to flock it."""
    return os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)


def close_fd(fd: int) -> None:
    os.close(fd)


def read_at(fd: int, size: int, offset: int = 0) -> bytes:
    """Up to ``size`` bytes of ``fd`` from ``offset`` (the file position is unchanged)."""
    return os.pread(fd, size, offset)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` at ``fd``'s position."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def try_flock(fd: int) -> bool | None:
    """Exclusive ``flock`` without waiting: True locked; False someone else holds it; None this
    file system cannot lock it (NFS directories, some FUSE mounts). Other errors raise ``OSError``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    return True


def file_identity(path: str) -> tuple[int, int]:
    """``(device, inode)`` of ``path`` itself (a symlink is not followed)."""
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def regular_file_size(path: str) -> int | None:
    """The size of ``path`` if it is a regular file (not through a symlink), else ``None``.
    A missing file raises ``FileNotFoundError``."""
    st = os.lstat(path)
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def list_dir(path: str) -> list[str]:
    """The names in directory ``path``, sorted. Raises ``OSError`` (missing, unreadable, not a
    directory); :func:`list_names` answers ``[]`` instead."""
    return sorted(os.listdir(path))


def make_dir(path: str) -> None:
    """Create one directory (its parent must exist); an existing one raises ``FileExistsError``."""
    os.mkdir(path, 0o755)


def make_dirs(path: str) -> None:
    """Create a directory and its parents; an existing directory is fine."""
    os.makedirs(path, exist_ok=True)


def rename(old: str, new: str) -> None:
    """``rename(2)``: atomic within one file system; replaces an existing file or empty directory."""
    os.rename(old, new)


def remove_file(path: str, missing_ok: bool = False) -> None:
    """Unlink a file or symlink."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_tree(path: str, ignore_errors: bool = False) -> None:
    """Delete a directory tree (symlinks inside are removed, never followed)."""
    shutil.rmtree(path, ignore_errors=ignore_errors)


def remove_entry(path: str) -> None:
    """Delete a file, link or tree; one that is already gone (another cleaner) is fine."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2_fn: Any = None
_renameat2_loaded = False


def _load_renameat2() -> Any:
    global _renameat2_fn, _renameat2_loaded
    if not _renameat2_loaded:
        _renameat2_loaded = True
        try:
            libc = ctypes.CDLL(None, use_errno=True)  # the running process's symbols, libc's included
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2_fn = fn
        except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
            _renameat2_fn = None
    return _renameat2_fn


def _renameat2(old: str, new: str, flags: int) -> bool:
    """``renameat2(old, new, flags)``: True when done; False when the OS or file system lacks it.

    Any other failure raises ``OSError`` (``EEXIST`` for a taken name with ``RENAME_NOREPLACE``).
    """
    fn = _load_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL) or err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), old, None, new)


def rename_exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux ``RENAME_EXCHANGE``); False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(old: str, new: str) -> bool:
    """Rename only if ``new`` does not exist (``RENAME_NOREPLACE``); False where unsupported."""
    return _renameat2(old, new, _RENAME_NOREPLACE)


def manifest_file(path: str) -> str:
    """The manifest file of ``path``: ``<path>/manifest.json`` for a directory, else ``path`` itself."""
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def read_manifest_file(path: str) -> tuple[bytes, str]:
    """Bytes of the manifest of ``path`` (a checkpoint directory or a manifest file) and the file's
    path; :class:`ManifestError` naming it if missing, a symlink or too large. Bound to
    :meth:`CheckpointManifest.load`."""
    target = manifest_file(path)
    return read_manifest_bytes(target), target


def write_manifest_file(path: str, data: bytes) -> None:
    """Write manifest bytes atomically into ``path`` (a checkpoint directory or a file path).
    Bound to :meth:`CheckpointManifest.save`."""
    atomic_write_bytes(manifest_file(path), data)


_manifest.bind_files(read_manifest_file, write_manifest_file)
