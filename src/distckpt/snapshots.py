"""A bounded host-memory budget for the snapshots of an asynchronous save.

:class:`Snapshot` is called by :func:`distckpt.asyncsave.snapshot` for
``save_checkpoint(async_save=True)``; :func:`streamed` by
:func:`distckpt.saving.encoder` for the states :mod:`distckpt.hostcopy` does
not copy (tensor subclasses other than DTensor, say); both apply the budget when this rank's files hold
more bytes than the coordinator's ``async_snapshot_bytes``. Without a budget, every file is copied to host memory
before the call returns and the copies are kept for the next save (the fastest
return, but a second copy of the whole state, for good). With one, the copies
*stream*: the caller snapshots file after file, each into fresh buffers, while
the background thread writes them; before copying a file the caller waits
until the copies not yet written plus this file fit the budget (a single file
larger than the budget is copied alone, when nothing else is held; a member
writing one part of a balanced write counts, and copies, its part only). A written
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
from dataclasses import dataclass
from typing import Any

from .codec import EncodedState
from .hostcopy import StateCopy

__all__ = ["DEFAULT_SNAPSHOT_BYTES", "PredictedPart", "Snapshot", "SnapshotBudget", "streamed"]

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


@dataclass(frozen=True)
class PredictedPart(EncodedState):
    """Another member's part of a balanced write, reduced to the checksum its bytes had when the
    snapshot was taken (:func:`distckpt.asyncsave.snapshot` hashed the live state instead of
    copying it). The write phase reports ``checksum`` as its prediction
    (:func:`distckpt.saving.write`); it holds no tensors."""

    checksum: str = ""


class Snapshot:
    """This rank's copied states in one asynchronous save (:class:`~distckpt.hostcopy.StateCopy`
    by component key), filled on the caller's thread and read by the writing thread.

    Called by :mod:`distckpt.asyncsave`. ``only[key]``: the ``data_ptr()`` of
    the copy's tensors this rank writes (``None``: all of them; a member that
    writes one part of a balanced write copies only its part). Without a
    ``budget``, :meth:`pump` fills every copy at once and the copies are kept;
    with one, it fills them one by one within the budget while the writer
    encodes and writes them, and :meth:`produce` frees each once written.
    :meth:`state` (the writer) waits for a copy to be filled and raises a
    snapshot error. Not collective, no I/O.
    """

    def __init__(self, copies: dict[str, StateCopy], only: dict[str, set[int] | None], files: dict[str, int],
                 budget: SnapshotBudget | None,
                 predict: Callable[[], dict[str, dict[str, str]]] | None = None) -> None:
        self._copies = copies
        self._only = only
        # key -> another member's part path -> its checksum, from predict() on first need
        self._predict_call = predict
        self._predicted: dict[str, dict[str, str]] | None = None if predict is not None else {}
        self._predict_lock = threading.Lock()
        self._staged = threading.Event()  # the copy no longer reads the live state (see staged())
        self._late: BaseException | None = None  # found once the copies were handed over (staged())
        self._recheck: Callable[[], BaseException | None] | None = None  # (staged())
        self._trainer_looked = False  # confirm() by the trainer's thread
        self._writer_passed = False  # the writer is past its last chance to fail the save
        self._aborted = False
        self._files = files  # files this rank writes, per key: a copy is freed after the last one
        self._budget = budget
        # bytes copied per key, and the tensors of a part writer's copy left unfilled (never to be written)
        self._nbytes = {key: c.nbytes if (part := only[key]) is None else
                        sum(t.nbytes for t in c.targets if t.data_ptr() in part) for key, c in copies.items()}
        self._unfilled = {key: {t.data_ptr() for t in c.targets if t.numel()} - part
                          for key, c in copies.items() if (part := only[key]) is not None}
        self._filled: set[str] = set()
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    @property
    def nbytes(self) -> int:
        """Bytes this rank copies in all."""
        return sum(self._nbytes.values())

    def pump(self) -> None:
        """Caller's thread: fill every copy (within the budget, waiting for the writer as needed).
        Returns when all are filled or the writer gave up; a copy that fails ends the pump and its
        error reaches the writer (:meth:`state`); an interrupt reaches both."""
        for key, copy in self._copies.items():
            if self._aborted:
                return
            try:
                if self._budget is not None:
                    self._budget.acquire(self._nbytes[key])
                copy.fill(self._only[key])
            except _Aborted:
                return
            except BaseException as exc:  # an interrupt too: the writer must not wait for this copy forever
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                if not isinstance(exc, Exception):
                    raise
                return
            with self._cond:
                self._filled.add(key)
                self._cond.notify_all()

    def abort(self) -> None:
        """The write phase is over (or never began): a pump still copying stops before its next
        copy, and one waiting for the budget returns. Idempotent; from any thread."""
        self._aborted = True
        if self._budget is not None:
            self._budget.abort()

    def predictions(self) -> dict[str, dict[str, str]]:
        """The other members' part checksums taken from the live state (``predict()``, run once,
        by whichever thread asks first: the caller, the staging thread or the writer); raises
        what it raised."""
        with self._predict_lock:
            if self._predicted is None:
                assert self._predict_call is not None
                self._predicted = self._predict_call()
            return self._predicted

    def staged(self, error: BaseException | None = None,
               recheck: Callable[[], BaseException | None] | None = None) -> None:
        """The snapshot no longer reads the live state: every copy filled and every prediction
        taken. ``error`` (a tensor changed while it was copied, say) fails the save even when its
        copies were already handed over: :meth:`produce` raises it after its last job.
        ``recheck()`` looks at the live tensors once more (:meth:`confirm`)."""
        with self._cond:
            if error is not None and self._error is None:
                self._late = self._error = error
            self._recheck = recheck
            self._cond.notify_all()
        self._staged.set()

    def confirm(self, by_trainer: bool = True) -> tuple[BaseException | None, bool]:
        """Once staged, a last look at the live tensors (``recheck()``): ``(the change found or
        None, whether the save had already passed the point where it could still fail)``.

        Called by the trainer's thread in :meth:`~distckpt.handle.SaveHandle.wait_staged`,
        where no in-place change it started can still be running (torch counts a change only
        once it has finished); and by the writer after its last file, the last point where this
        rank's error fails the save. Each looks once; the writer does not look after the
        trainer has (changes after ``wait_staged`` are the trainer's right)."""
        self._staged.wait()
        with self._cond:
            if self._recheck is None or (by_trainer and self._trainer_looked):
                return None, self._writer_passed
            late = None if self._trainer_looked else self._recheck()
            self._trainer_looked = self._trainer_looked or by_trainer
            if late is not None and not self._writer_passed and self._late is None:
                self._late = late
            if not by_trainer:
                self._writer_passed = True
            # too late only for a change the writer did not see: one it saw is failing the save
            return late, by_trainer and self._writer_passed and self._late is None

    def state(self, key: str) -> Any:
        """Writer's thread: the copy of ``key`` once filled; raises the snapshot's error."""
        with self._cond:
            while key not in self._filled and self._error is None:
                self._cond.wait()
            if key not in self._filled:
                assert self._error is not None
                raise self._error
        return self._copies[key].state

    def produce(self, jobs: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
        """The write phase's job iterator: ``jobs()`` (the encoder, reading :meth:`state`), the
        other members' parts hashed at snapshot time given as :class:`PredictedPart`, each job
        checked to hold only copied bytes, and with a budget each copy freed once written."""
        def run() -> Iterator[Any]:
            left = dict(self._files)
            try:
                for job in jobs():
                    job = self._predict(job)
                    self._check(job)
                    yield job
                    key = job[0]
                    left[key] -= 1
                    if self._budget is not None and not left[key]:
                        self._copies[key].free()
                        self._budget.release(self._nbytes[key])
                self.confirm(by_trainer=False)  # (nothing to confirm unless staged in the background)
                if self._late is not None:  # the last point where this rank's error still fails the save
                    raise self._late
            finally:
                if self._budget is not None:
                    self._budget.abort()  # done or failed: a waiting pump must not wait for this thread again
        return run

    def _predict(self, job: Any) -> Any:
        """``job`` with the other members' parts whose checksums were taken at snapshot time
        replaced by :class:`PredictedPart` (their bytes were hashed, not copied)."""
        if not job[4]:
            return job
        predicted = self.predictions().get(job[0])
        if not predicted:
            return job
        siblings = tuple((path, PredictedPart(header=piece.header, tensors=(), checksum=predicted[path]))
                         if path in predicted else (path, piece) for path, piece in job[4])
        return (*job[:4], siblings)

    def _check(self, job: Any) -> None:
        """A part writer copied only its part: refuse a job that would write a byte it did not copy."""
        unfilled = self._unfilled.get(job[0])
        if not unfilled:
            return
        for piece in (job[2], *(p for _, p in job[4])):
            if any(t.numel() and t.data_ptr() in unfilled for t in piece.tensors):
                raise RuntimeError(f"distckpt: internal error: {job[1]} would be written from bytes this "
                                   "rank's snapshot did not copy; nothing was committed")
