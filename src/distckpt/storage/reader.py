"""Reading checkpoint files back, verified: the load path's hot loop.

Opening refuses symlinks and anything but a regular file (a FIFO never
blocks); :class:`VerifiedReader` checks the size on opening and hashes the
bytes while they are still in cache, raising :class:`IntegrityError` naming
the file when the checksum differs. Callers: the load path,
:mod:`distckpt.reading` (:class:`VerifiedReader`, :func:`read_verified`, and
:func:`read_prefix` for the headers the state check reads first);
:mod:`.inspection` (:func:`open_regular_file`) and :mod:`.directories`
(``_open_regular``, for manifests). Not collective. torch is imported only to
allocate a read buffer.
"""

from __future__ import annotations

import errno
import os
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from ..errors import IntegrityError
from ..hashing import PipelinedHasher
from .posix import _IOV_BATCH, open_regular_fd

_READ_PIECE = 16 * 1024 * 1024  # hashed while still in cache


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
        """Read the next ``sum(len(v))`` bytes of the file into ``views``, in order.

        One ``readv`` per 512 views or 16 MiB; a batch read whole goes to the hasher in one
        hand-over (the common case: no work per view here), a short read view by view.
        """
        pending = list(views)  # a copy: a short read replaces a view by its unread rest
        lengths = list(map(len, pending))
        if lengths and (max(lengths) > _READ_PIECE or not min(lengths)):
            # large buffers read and hashed a piece at a time; empty ones dropped
            pending = [v[i:i + _READ_PIECE] for v in pending for i in range(0, len(v), _READ_PIECE)]
            lengths = list(map(len, pending))
        ends = list(accumulate(lengths))  # ends[k]: bytes up to the end of view k
        i = 0
        done = 0  # bytes of pending[:i]
        count = len(pending)
        while i < count:
            # up to 512 views, stopping after the view that reaches 16 MiB
            stop = min(i + _IOV_BATCH, bisect_left(ends, done + _READ_PIECE, i) + 1, count)
            batch = pending[i:stop]
            want = ends[stop - 1] - done
            n = os.readv(self._fd, batch)
            if n == 0:
                raise IntegrityError(f"{self.path}: file shrank while being read")
            self.position += n
            if n == want:
                self._hasher.update_many(batch, n)
                done += n
                i = stop
                continue
            while n:  # a short read: hash what arrived, re-read the rest of a view cut short
                v = pending[i]
                if n >= len(v):
                    self._hasher.update(v)
                    n -= len(v)
                    done += len(v)
                    i += 1
                else:
                    self._hasher.update(v[:n])
                    pending[i] = v[n:]
                    done += n
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

