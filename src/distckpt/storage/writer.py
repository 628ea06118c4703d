"""Writing checkpoint files: the save path's hot loop.

A file is created (never over an existing one, never through a symlink),
every byte is copied into private per-thread buffers, hashed there and handed
to a worker thread's ``writev`` meanwhile (which asks the kernel to start
writeback every few tens of MiB, so the disk works while the file is still
being written), then fsynced. With ``direct=True`` the writes go around the
page cache (``O_DIRECT``, where the file system allows it): whole aligned
buffers, the last one padded and the file cut back to its size. Small files and
manifests go through a temporary file and a rename (:func:`atomic_write_bytes`).
Callers: :mod:`distckpt.saving` (:func:`write_runs`, for the runs of
:meth:`distckpt.codec.EncodedState.runs`), the CLI's convert and tests
(:func:`write_file`), :mod:`.directories` (manifests). Not collective. torch
is imported only when a buffer is first needed (``distckpt ls``/``inspect``/
``verify`` never load it). On failure the partial file is removed and the
``OSError`` propagates.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import threading
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .. import hashing
from ..hashing import CHECKSUM_ALGORITHM
from . import posix
from .posix import _IOV_BATCH, DIRECT_ALIGN, fsync_dir

if TYPE_CHECKING:
    import torch

_BOUNCE_BYTES = 4 * 1024 * 1024  # bytes per private write buffer
_BOUNCE_COUNT = 3  # buffers per writing thread: one being filled and hashed, up to two being written
_WRITEBACK_STEP = 32 * 1024 * 1024  # the write worker asks the kernel to start writeback every this many bytes


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
    """A few private buffers a writing thread copies file bytes into (kept for its next file),
    each starting at a :data:`~.posix.DIRECT_ALIGN` boundary (as ``O_DIRECT`` needs).

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
            spare = torch.empty(_BOUNCE_BYTES + DIRECT_ALIGN, dtype=torch.uint8)  # never zero-filled
            skip = -spare.data_ptr() % DIRECT_ALIGN
            tensor = spare[skip:skip + _BOUNCE_BYTES]  # a view: keeps the whole allocation alive
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

    ``direct``: ``fd`` was opened with ``O_DIRECT``. Every write is then a whole bounce
    buffer (owned views are copied too, and a run that would straddle two buffers is
    copied tensor by tensor), except the last, padded with zeros to the alignment; the
    caller cuts the file back to :attr:`size`. A file system that refuses the first such
    write gets ordinary writes instead.
    """

    def __init__(self, fd: int, direct: bool = False) -> None:
        self.fd = fd
        self.direct = direct
        self.ring = _bounce()
        self.hasher = hashing.new_hasher(CHECKSUM_ALGORITHM)
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
        import torch  # loaded by then: the caller's tensors are torch's

        dtype = tensors[0].dtype
        itemsize = tensors[0].element_size()
        if self._owned:
            self._release_owned()
        if self.fill + nbytes > _BOUNCE_BYTES or self.fill % itemsize:
            if self.direct:  # only whole buffers may be written: fill this one up, go on in the next
                # here, with torch, not at the top (see _Bounce)
                from ..codec.dtypes import flat_bytes

                for t in tensors:
                    raw: Any = flat_bytes(t).numpy()
                    self._copy(memoryview(raw))
                self.size += nbytes
                return
            self._flush()
        self.ring.buffer(self.index)
        target = self.ring.tensors[self.index][self.fill:self.fill + nbytes].view(dtype)

        with torch.no_grad():  # a Parameter that requires grad is copied as plain memory (cat(out=) refuses it)
            if max(map(torch.Tensor.dim, tensors)) <= 1:  # 0-d ones made 1-d in C++ (no view(-1) call each)
                torch.hstack(tensors, out=target)
            else:
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
        if owned and not self.direct:
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
        length = self._padded(index, length)
        self.ring.free[index].clear()
        self._submit((index, length))
        self.index = (index + 1) % _BOUNCE_COUNT
        self.fill = 0
        self.ring.buffer(self.index)
        self.ring.free[self.index].wait()  # the worker is done writing the buffer filled next
        if self._error is not None:
            raise self._error

    def _padded(self, index: int, length: int) -> int:
        """``length`` rounded up to the alignment in direct mode (only the last buffer of a file is
        short), the bytes added zeroed; ``length`` itself otherwise."""
        if not self.direct or not length % DIRECT_ALIGN:
            return length
        padded = length + DIRECT_ALIGN - length % DIRECT_ALIGN
        buffer = self.ring.buffer(index)
        buffer[length:padded] = bytes(padded - length)
        return padded

    def _write(self, views: list[memoryview], first: bool) -> None:
        """``writev`` all of ``views``; in direct mode, a refusal of the file's ``first`` write
        (``EINVAL``: a file system that opened the file so but cannot write it so) turns
        ``O_DIRECT`` off and writes again."""
        try:
            _writev_all(self.fd, views)
        except OSError as exc:
            if not (self.direct and first and exc.errno == errno.EINVAL and posix.stop_direct(self.fd)):
                raise
            self.direct = False  # the padding still goes out; the caller cuts the file to its size
            _writev_all(self.fd, views)

    def _work(self) -> None:
        """The write worker: ``writev`` each job in order and, every :data:`_WRITEBACK_STEP` bytes,
        ask the kernel to start writing them to the disk (the final ``fsync`` then waits less)."""
        assert self._queue is not None
        written = hinted = 0
        hint = True
        while (job := self._queue.get()) is not None:
            try:
                if self._error is None:
                    views = [self.ring.buffers[job[0]][:job[1]]] if isinstance(job, tuple) else job
                    self._write(views, not written)
                    written += sum(len(v) for v in views)
                    if hint and not self.direct and written - hinted >= _WRITEBACK_STEP:
                        hint = posix.start_writeback(self.fd, hinted, written - hinted)
                        hinted = written
            except BaseException as exc:  # raised by the caller's next call or finish
                self._error = exc
            finally:
                if isinstance(job, tuple):
                    self.ring.free[job[0]].set()

    def finish(self) -> str:
        """Write what is left, wait for the writer; ``"<algorithm>:<hex>"`` of every byte written."""
        if self._queue is None:  # everything fits one hand-over: write it here, no thread
            if self.fill:  # the real bytes hashed, the padded length (direct mode) written
                buffer = self.ring.buffer(self.index)
                self.hasher.update(buffer[:self.fill])
                data = [buffer[:self._padded(self.index, self.fill)]]
            else:
                data = self._owned
                for piece in data:
                    self.hasher.update(piece)
            self._write(data, True)
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


def write_runs(path: str, runs: Iterable[Run], *, direct: bool = False) -> tuple[int, str]:
    """:func:`write_file` for the runs of :meth:`distckpt.codec.EncodedState.runs`.

    Called by the save path (writers only); not collective. ``(view, True)``
    is a private copy, hashed and written as it is; ``(view, False)`` is
    copied into this thread's buffers first (see :func:`write_file`), and so
    is ``(tensors, nbytes)``, with one ``torch.cat`` for the whole run: one
    copy, one hash and one write per few MiB, not per tensor. Returns
    ``(size, "<algorithm>:<hex>")``; on failure the partial file is removed
    and the ``OSError`` propagates. ``direct=True``: write around the page cache
    (``O_DIRECT``) where the file system allows it, else as usual; the bytes,
    size and checksum are the same either way.
    """
    fd, direct = posix.create_data_file(path, direct)
    writer = _RunWriter(fd, direct)
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
        if direct and writer.size % DIRECT_ALIGN:
            os.ftruncate(fd, writer.size)  # the padding of the last direct write
        os.fsync(fd)
    except BaseException:
        writer.close()
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return writer.size, checksum


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

