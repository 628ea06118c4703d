"""Looking at checkpoints from outside a job: the file checks of the CLI and the offline tools.

Callers: the CLI (``ls``, ``inspect``, ``verify``, ``convert``),
:func:`distckpt.verify_checkpoint`, :func:`distckpt.diff_checkpoints` and
legacy conversion (:mod:`distckpt.legacy`); :func:`path_info` and
:func:`list_names` also serve :mod:`distckpt.folder`, :mod:`distckpt.series`
and :mod:`distckpt.loading`. Every file-system call of the offline callers
lives here, so that they stay free of ``os`` calls and of torch (``distckpt
ls``/``inspect``/``verify`` start without importing it). Opening refuses
symlinks and never blocks on a FIFO (:func:`.posix.open_regular_fd`).
Nothing here is collective; each function says what it raises.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from .. import hashing
from ..errors import IntegrityError
from .posix import _O_CLOEXEC, _O_NOFOLLOW, fsync_dir, read_bounded
from .reader import open_regular_file

_CHECK_CHUNK = 8 * 1024 * 1024  # bytes per read while verifying a file: memory stays flat


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
        hasher = hashing.new_hasher(algorithm)
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
        return read_bounded(fd, limit)  # TooLarge is a ValueError
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

