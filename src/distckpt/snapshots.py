"""A bounded host-memory budget for the snapshots of an asynchronous save.

Called by :func:`distckpt.saving.encoder` for ``save_checkpoint(async_save=True)``
when this rank's files hold more bytes than the coordinator's
``async_snapshot_bytes``. Without a budget, every file is copied to host memory
before the call returns and the copies are kept for the next save (the fastest
return, but a second copy of the whole state, for good). With one, the copies
*stream*: the caller snapshots file after file, each into fresh buffers, while
the background thread writes them; before copying a file the caller waits
until the copies not yet written plus this file fit the budget (a single file
larger than the budget is copied alone, when nothing else is held). A written
file's buffers are freed at once. The call then returns later (it waits for
the disk for the part of the state beyond the budget), and host memory stays
bounded by the budget or the largest file, whichever is larger.

Not collective, no I/O: a producer-consumer between two threads of one rank.
An error while snapshotting reaches the write phase (so every rank hears it);
a write phase that gives up releases the caller at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["DEFAULT_SNAPSHOT_BYTES", "SnapshotBudget", "streamed"]

#: Default ``async_snapshot_bytes``: host memory one rank's asynchronous snapshot may hold (8 GiB).
DEFAULT_SNAPSHOT_BYTES = 8 * 2**30


class _Aborted(Exception):
    """The consumer stopped (the write phase failed): stop snapshotting."""


class SnapshotBudget:
    """Bytes of snapshots held and not yet written, at most ``limit`` (or one item alone).

    Thread-safe; :meth:`acquire` blocks the snapshotting thread, :meth:`release`
    is called by the writing thread, :meth:`abort` by a writer that gives up.
    """

    def __init__(self, limit: int) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit: expected a positive int, got {limit!r}")
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.waits = 0
        self.aborted = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            if self.held and self.held + nbytes > self.limit:
                self.waits += 1
            while self.held and self.held + nbytes > self.limit and not self.aborted:
                self._cond.wait()
            if self.aborted:
                raise _Aborted
            self.held += nbytes
            self.peak = max(self.peak, self.held)

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self.aborted = True
            self._cond.notify_all()


def _free(job: Any) -> None:
    """Give back the memory of a written job's snapshot buffers (private copies nobody reads again):
    each tensor lets go of its storage (the writer's views of it are gone once the file is written)."""
    encoded, siblings = job[2], job[4]
    for state in (encoded, *(piece for _, piece in siblings)):
        for t in state.tensors:
            t.set_()


def streamed(jobs: Callable[[Callable[[int], None]], Iterator[Any]],
             budget: SnapshotBudget) -> tuple[Callable[[], Iterator[Any]], Callable[[], None]]:
    """``(produce, pump)`` for an asynchronous save under ``budget``.

    ``jobs(reserve)`` snapshots this rank's files one by one, calling
    ``reserve(nbytes)`` before copying each. ``pump()`` runs it on the
    caller's thread, handing each job over as soon as it is copied; it
    returns when every file is copied (or the writer gave up). ``produce()``
    is the write phase's job iterator, on the background thread: it frees
    each job's buffers and releases its bytes once the next job is asked for
    (the previous one is written by then), and raises a snapshot error.
    """
    handed: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    sizes: queue.SimpleQueue[int] = queue.SimpleQueue()

    def reserve(nbytes: int) -> None:
        budget.acquire(nbytes)
        sizes.put(nbytes)

    def pump() -> None:
        try:
            for job in jobs(reserve):
                handed.put(("job", job))
        except _Aborted:
            pass
        except Exception as exc:  # raised by produce(), inside the write phase
            handed.put(("error", exc))
        handed.put(("end", None))

    def produce() -> Iterator[Any]:
        try:
            while True:
                kind, item = handed.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
                _free(item)
                budget.release(sizes.get())
        finally:
            budget.abort()  # done or failed: a waiting pump must not wait for this thread again

    return produce, pump
