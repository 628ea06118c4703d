"""Hashing: the checksums of checkpoint files and of the small digests the protocol compares.

Pure (no I/O, no collectives). Called by :mod:`distckpt.storage` (hashing
while writing and reading), :mod:`distckpt.planning` (plan and manifest
digests), the validation phase, and the CLI. A checksum is written
``"<algorithm>:<hex>"``; ``xxh3-128`` for files, ``xxh3-64`` for digests that
only travel between ranks, ``sha256`` where a manifest asks for it. An
unknown algorithm raises :class:`~distckpt.errors.IntegrityError`.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import xxhash

from .errors import IntegrityError

__all__ = [
    "CHECKSUM_ALGORITHM",
    "BackgroundChecksums",
    "Hasher",
    "PipelinedHasher",
    "checksum_of",
    "checksum_of_chunks",
    "digest64",
    "new_hasher",
]

CHECKSUM_ALGORITHM = "xxh3-128"
_HASH_BATCH = 8 * 1024 * 1024  # bytes per hand-over to the hashing thread


class Hasher(Protocol):
    """A streaming hasher: ``update`` in order, then ``hexdigest``."""

    def update(self, data: bytes | memoryview | bytearray, /) -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher(algorithm: str = CHECKSUM_ALGORITHM) -> Hasher:
    """A streaming hasher for ``algorithm`` ("xxh3-128", "xxh3-64" or "sha256")."""
    if algorithm == "xxh3-128":
        return xxhash.xxh3_128()
    if algorithm == "xxh3-64":
        return xxhash.xxh3_64()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise IntegrityError(f"unknown checksum algorithm {algorithm!r}")


class PipelinedHasher:
    """A streaming hasher that hashes in a worker thread, in order, while the caller does I/O.

    xxhash releases the GIL, so hashing chunk *n* overlaps the ``readv`` or
    ``writev`` of chunk *n + 1*. Views are handed over in batches of a few MiB
    (a queue operation per tiny tensor would cost more than hashing it); a
    file smaller than one batch is hashed inline, without a thread. The caller
    must keep the viewed memory unchanged until :meth:`hexdigest` returns, and
    call :meth:`close` if it gives up early.
    """

    def __init__(self, algorithm: str = CHECKSUM_ALGORITHM) -> None:
        self._hasher = new_hasher(algorithm)
        self._batch: list[memoryview] = []
        self._bytes = 0
        self._queue: queue.SimpleQueue[list[memoryview] | None] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def update(self, view: memoryview) -> None:
        self._batch.append(view)
        self._bytes += len(view)
        if self._bytes >= _HASH_BATCH:
            self._submit()

    def update_many(self, views: list[memoryview], nbytes: int) -> None:
        """As ``update`` for each of ``views`` in order (``nbytes`` their total length), in one call."""
        self._batch += views
        self._bytes += nbytes
        if self._bytes >= _HASH_BATCH:
            self._submit()

    def _submit(self) -> None:
        batch, self._batch, self._bytes = self._batch, [], 0
        if not batch:
            return
        if self._queue is None:
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._work, name="distckpt-hash", daemon=True)
            self._thread.start()
        self._queue.put(batch)

    def _work(self) -> None:
        assert self._queue is not None
        while (batch := self._queue.get()) is not None:
            try:
                for view in batch:
                    self._hasher.update(view)
            except BaseException as exc:  # reported by hexdigest
                self._error = exc

    def hexdigest(self) -> str:
        """Wait for every pending batch, then the digest of everything given to :meth:`update`."""
        if self._queue is None:  # small: everything is still in the batch; no thread needed
            for view in self._batch:
                self._hasher.update(view)
            self._batch = []
        else:
            self._submit()
            self.close()
        if self._error is not None:
            raise self._error
        return self._hasher.hexdigest()

    def close(self) -> None:
        """Stop the worker (idempotent)."""
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


def checksum_of(data: bytes | bytearray | memoryview, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """``"<algorithm>:<hex>"`` of ``data``."""
    h = new_hasher(algorithm)
    h.update(data)
    return f"{algorithm}:{h.hexdigest()}"


def digest64(data: bytes | bytearray | memoryview) -> int:
    """The xxh3-64 of ``data`` as an int: the digests the ranks compare (reports, call arguments)."""
    return xxhash.xxh3_64_intdigest(data)


def checksum_of_chunks(chunks: Iterable[memoryview | bytes]) -> str:
    """``"<algorithm>:<hex>"`` that :func:`write_file` would give for ``chunks``, without writing.

    Called by the writer of a balanced write's part 0 to predict the other
    parts' checksums from its own replica. Not collective; no I/O.
    """
    h = new_hasher(CHECKSUM_ALGORITHM)
    for chunk in chunks:
        h.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"


class BackgroundChecksums:
    """:func:`checksum_of_chunks` of several files, computed in a worker thread meanwhile.

    Called by the save path's part-0 writer of a balanced write, which
    predicts its siblings' checksums while its own file is written and
    fsynced (xxhash releases the GIL, so the hashing fills the time the
    writer spends waiting for the disk). ``sources`` are ``(name, chunks)``
    with ``chunks`` called in the worker; no sources, no thread. Not
    collective; no I/O. :meth:`result` waits and returns ``{name: checksum}``,
    raising whatever the worker raised; :meth:`cancel` stops it early (at the
    next chunk) and waits for it.
    """

    def __init__(self, sources: Sequence[tuple[str, Callable[[], Iterable[memoryview | bytes]]]]) -> None:
        self._sources = list(sources)
        self._results: dict[str, str] = {}
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread: threading.Thread | None = None
        if self._sources:
            self._thread = threading.Thread(target=self._work, name="distckpt-predict", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        try:
            for name, chunks in self._sources:
                checksum = checksum_of_chunks(self._until_cancelled(chunks()))
                if self._cancelled:  # never a checksum of part of a file
                    return
                self._results[name] = checksum
        except BaseException as exc:  # raised by result()
            self._error = exc

    def _until_cancelled(self, chunks: Iterable[memoryview | bytes]) -> Iterator[memoryview | bytes]:
        for chunk in chunks:
            if self._cancelled:
                return
            yield chunk

    def result(self) -> dict[str, str]:
        """Wait for the worker; ``{name: "<algorithm>:<hex>"}`` in the order given."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise RuntimeError("the checksums were cancelled")
        return {name: self._results[name] for name, _ in self._sources}

    def cancel(self) -> None:
        """Stop the worker at its next chunk and wait for it (idempotent)."""
        self._cancelled = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
