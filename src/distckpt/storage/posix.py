"""POSIX primitives: the one place in distckpt that knows flags, ``flock``, ``renameat2`` and errno values.

Every other part of the library (the folder's staging and commit, the locks,
the series, the load phases, the manifest's load and save, and the rest of
:mod:`distckpt.storage`) reaches the disk through these functions: the seam a
second storage backend would plug into. Callers: :mod:`distckpt.folder`,
:mod:`distckpt.locks`, :mod:`distckpt.series` (through the package
:mod:`distckpt.storage`) and the sibling modules :mod:`.writer`,
:mod:`.reader`, :mod:`.directories` and :mod:`.inspection`. Nothing here is
collective; none of it is on the hot path of writing or reading checkpoint
data. Failures raise ``OSError`` unless a function says otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
from typing import Any

_IOV_BATCH = 512  # buffers per readv/writev (IOV_MAX is 1024 on Linux)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
#: errno values meaning "this file system cannot do this" (flock, renameat2), not "someone holds it".
_UNSUPPORTED = {errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)}


def fsync_dir(path: str) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



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


#: O_DIRECT's alignment: file offsets, lengths and buffer addresses are multiples of it (4 KiB covers
#: the 512-byte and 4-KiB logical blocks of every common device).
DIRECT_ALIGN = 4096
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def create_data_file(path: str, direct: bool = False) -> tuple[int, bool]:
    """Create ``path`` for writing (never an existing one, never through a symlink): ``(fd, direct)``.

    ``direct=True`` asks for ``O_DIRECT`` (writes that go around the page
    cache, in :data:`DIRECT_ALIGN` units); where the platform or file system
    refuses it, the file is created for ordinary writes and the second value
    says so. Called by :func:`.writer.write_runs`. Other failures raise ``OSError``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
    if direct and _O_DIRECT:
        try:
            return os.open(path, flags | _O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            # O_EXCL: the file did not exist before, so a file left by the refused open is ours
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return os.open(path, flags, 0o644), False


def stop_direct(fd: int) -> bool:
    """Turn ``O_DIRECT`` off on ``fd`` (a file system that opened it so but refuses such writes):
    True when done. Called by the write worker of :mod:`.writer` once, before any byte is written."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    except OSError:
        return False
    return True


def open_dir_fd(path: str) -> int:
    """A read-only descriptor of the directory ``path`` (never through a symlink), e.g. to flock it."""
    return os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)


def close_fd(fd: int) -> None:
    os.close(fd)


def read_at(fd: int, size: int, offset: int = 0) -> bytes:
    """Up to ``size`` bytes of ``fd`` from ``offset`` (the file position is unchanged)."""
    return os.pread(fd, size, offset)


class TooLarge(ValueError):
    """Raised by :func:`read_bounded`: ``size`` is the file's size when it was over the
    limit from the start, ``None`` when it grew past the limit while being read."""

    def __init__(self, limit: int, size: int | None) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.limit, self.size = limit, size


def read_bounded(fd: int, limit: int) -> bytes:
    """All of ``fd`` from its position, refusing more than ``limit`` bytes (:class:`TooLarge`),
    even when the file grows while being read. Called by the manifest and small-file reads."""
    size = os.fstat(fd).st_size
    if size > limit:
        raise TooLarge(limit, size)
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise TooLarge(limit, None)
    return b"".join(chunks)


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
_libc_functions: dict[str, Any] = {}


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """The running process's libc function ``name`` (errno kept), looked up once; ``None`` where this
    OS or libc lacks it (not Linux; ``renameat2`` needs glibc 2.28). Callers pass 64-bit ``off_t``
    argument types only on a 64-bit ABI."""
    if name not in _libc_functions:
        fn: Any = None
        try:
            fn = getattr(ctypes.CDLL(None, use_errno=True), name)  # the process's symbols, libc's included
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _libc_functions[name] = fn
    return _libc_functions[name]


def _renameat2(old: str, new: str, flags: int) -> bool:
    """``renameat2(old, new, flags)``: True when done; False when the OS or file system lacks it.

    Any other failure raises ``OSError`` (``EEXIST`` for a taken name with ``RENAME_NOREPLACE``).
    """
    fn = _libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL) or err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), old, None, new)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` from ``offset`` to the disk now,
    without waiting for them (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``).

    A hint only: it makes the disk work while the caller is still writing, so
    the final ``fsync`` has less left to wait for; durability still comes from
    that ``fsync``, which also reports any write error. Called by the write
    worker of :mod:`.writer` (the GIL is released during the call). Returns
    False, and never raises, when the OS or file system cannot do it or the
    call fails for any reason: the caller then stops asking for that file.
    """
    if ctypes.sizeof(ctypes.c_void_p) != 8:  # off_t is 64 bits only on 64-bit ABIs
        return False
    fn = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if fn is None:
        return False
    return bool(fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE) == 0)


def rename_exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux ``RENAME_EXCHANGE``); False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(old: str, new: str) -> bool:
    """Rename only if ``new`` does not exist (``RENAME_NOREPLACE``); False where unsupported."""
    return _renameat2(old, new, _RENAME_NOREPLACE)
