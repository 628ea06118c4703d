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
from collections.abc import Iterable
from typing import Protocol

import xxhash

from .errors import IntegrityError

__all__ = [
    "CHECKSUM_ALGORITHM",
    "Hasher",
    "PipelinedHasher",
    "checksum_of",
    "checksum_of_chunks",
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


def checksum_of_chunks(chunks: Iterable[memoryview | bytes]) -> str:
    """``"<algorithm>:<hex>"`` that :func:`write_file` would give for ``chunks``, without writing.

    Called by the writer of a balanced write's part 0 to predict the other
    parts' checksums from its own replica. Not collective; no I/O.
    """
    h = new_hasher(CHECKSUM_ALGORITHM)
    for chunk in chunks:
        h.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"
