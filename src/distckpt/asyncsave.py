"""Asynchronous staging: the write and commit of a save, in a background thread on a channel of its own.

Called by the coordinator's facade: :meth:`AsyncSaves.start` from
``save_checkpoint(async_save=True)`` after the plan and validation phases,
:meth:`AsyncSaves.wait` at the start of every save and load and from
``CheckpointCoordinator.wait()``; :func:`snapshot` from the facade (through
:meth:`AsyncSaves.start`). The snapshot to host memory happens on the
caller's thread, so the training loop may change its tensors as soon as
:meth:`start` returns; it is only a copy (one walk of each state this rank
writes, one batched copy, :mod:`distckpt.hostcopy`): encoding the copy into
files is left to the background thread. The background thread runs the write and commit phases
(:mod:`distckpt.saving`) on a channel forked from the coordinator's
(:meth:`~distckpt.transport.ForkingComm.fork`), so its collectives never interleave
with a later synchronous call's. Its outcome travels in a
:class:`~distckpt.handle.SaveHandle`; on failure rank 0 removes the staging
directory and the error waits for the next :meth:`wait` (on every rank).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch

from . import folder, saving
from .codec import encode, tensor_bytes
from .components import StateComponent
from .handle import SaveHandle
from .hashing import BackgroundChecksums
from .hostcopy import Kept, StateCopy, Unsupported
from .layout import FilePlan
from .planning import Job, Produce, SavePlan
from .snapshots import Snapshot, SnapshotBudget
from .transport import Comm, ForkingComm, check_comm

__all__ = ["AsyncSaves", "snapshot"]

log = logging.getLogger("distckpt")


class AsyncSaves:
    """The asynchronous saves of one coordinator: its background channel, the pending save,
    and the host buffers of the last snapshot (reused by the next one)."""

    def __init__(self) -> None:
        self.comm: ForkingComm | None = None
        self.pending: SaveHandle | None = None
        # Host buffers of the last asynchronous snapshot, reused by the next one.
        self.snapshots: dict[str, dict[int, torch.Tensor]] = {}

    def channel(self, comm: Comm) -> Comm:
        """The background channel, forked from ``comm`` on first use or after its last collective failed.

        Collective (forking builds process groups; that failure reached every
        rank, so every rank replaces it together). The background thread never
        builds groups itself. ``TypeError`` when ``comm`` is not a
        :class:`~distckpt.transport.ForkingComm` (the facade checks that first).
        """
        if self.comm is None or self.comm.broken:
            check_comm(comm, ForkingComm, "async_save")
            assert isinstance(comm, ForkingComm)
            self.comm = comm.fork()
        return self.comm

    def start(self, comm: Comm, plan: SavePlan, snapshot: Callable[[dict[str, dict[int, torch.Tensor]]], Produce],
              finish: Callable[[Comm, Produce], None], started: float) -> SaveHandle:
        """Fork the channel if needed, snapshot this rank's files (``snapshot(buffers)``), then run
        ``finish(channel, produce)`` (the write and commit phases) in a non-daemon thread.

        Returns at once with the :class:`SaveHandle`. On failure of the
        thread, rank 0 removes the staging directory and the handle holds the error.
        """
        background = self.channel(comm)
        produce = snapshot(self.snapshots)
        pump = getattr(produce, "pump", None)  # snapshots beyond the memory budget stream (distckpt.snapshots)
        handle = SaveHandle(plan.path)
        log.debug("distckpt: %s snapshotted in %.3f s; writing in the background", plan.path,
                  time.perf_counter() - started)

        def run() -> None:
            try:
                finish(background, produce)
            except BaseException as exc:
                if comm.rank == 0:
                    folder.discard_staging(plan.staging)
                handle._finish(exc)
            else:
                handle._finish(None)

        self.pending = handle
        threading.Thread(target=run, name=f"distckpt-save-{plan.checkpoint_id}", daemon=False).start()
        if pump is not None:
            pump()  # returns once every file is copied; the thread writes them meanwhile
        return handle

    def wait(self) -> str | None:
        """Finish the pending save: its path, ``None`` if there was none (or its error was already
        raised by :meth:`SaveHandle.result`); raises its error otherwise."""
        handle, self.pending = self.pending, None
        return None if handle is None else handle._settle()


class _Copied(saving.States):
    """The states the background encoder reads: this rank's copies, once filled."""

    def __init__(self, snap: Snapshot) -> None:
        super().__init__({})
        self._snap = snap

    def __call__(self, key: str) -> Any:
        return self._snap.state(key)


def snapshot(rank: int, components: Sequence[StateComponent], plan: SavePlan, states: saving.States,
             buffers: dict[str, dict[int, torch.Tensor]], budget: int | None) -> Produce:
    """This rank's files of an asynchronous save: the states it writes copied now, encoded later.

    Called on the caller's thread by :meth:`AsyncSaves.start` (through the
    coordinator). Copies every state this rank writes (:class:`StateCopy`:
    one walk, one batched copy, into ``buffers`` kept from the last snapshot)
    and returns the write phase's producer, which encodes the copies in the
    background thread exactly as a synchronous save encodes the live state.
    The writer of one part of a balanced write copies only that part (part 0's
    writer hashes the other parts now, for its prediction of their checksums). Beyond
    ``budget`` bytes the copies stream (:class:`Snapshot`; the producer has a
    ``pump``, run by :meth:`AsyncSaves.start`). A state the copy does not
    know (a DTensor, say) takes the general path,
    :func:`distckpt.saving.encoder`. Local; an error is not raised here but
    by the producer, inside the write phase, so every rank hears it.
    """
    files: dict[str, list[Any]] = {}
    for c in components:
        mine = [f for f in plan.components[c.key].files if f.writer == rank]
        if mine:
            files[c.key] = mine
    try:
        try:
            copies = {key: StateCopy(states(key), _kept(buffers, key)) for key in files}
        except Unsupported:
            return saving.encoder(rank, components, plan, states, buffers, budget)
        streams = budget is not None and sum(c.nbytes for c in copies.values()) > budget
        if streams:
            buffers.clear()  # buffers kept from an earlier save would count against the budget
            for copy in copies.values():
                copy.drop_buffers()
        only: dict[str, set[int] | None] = {}
        siblings: list[tuple[str, Callable[[], list[memoryview]]]] = []
        owner: dict[str, str] = {}  # sibling part path -> component key
        for key, fs in files.items():
            only[key], hashed = _parts(copies[key], fs, plan.components[key].files)
            siblings.extend(hashed)
            owner.update((path, key) for path, _ in hashed)
        predicted: dict[str, dict[str, str]] = {key: {} for key in files}
        snap = Snapshot(copies, only, {key: len(fs) for key, fs in files.items()},
                        SnapshotBudget(budget) if streams and budget is not None else None, predicted)
        produce = snap.produce(saving.encoder(rank, components, plan, _Copied(snap)))
        # the other members' parts are hashed from the live bytes in a worker (xxhash releases the
        # GIL) while this thread copies, and always before the call returns
        hashing = BackgroundChecksums(siblings)
        try:
            if not streams:
                snap.pump()
            for path, checksum in hashing.result().items():
                predicted[owner[path]][path] = checksum
        finally:
            hashing.cancel()  # (done by now, unless the copy was interrupted)
        if streams:
            produce.pump = snap.pump  # type: ignore[attr-defined]
        return produce
    except Exception as exc:  # reported through the write phase, so every rank hears it
        error = exc

        def failed() -> Iterator[Job]:
            raise error
        return failed


def _kept(buffers: dict[str, dict[int, torch.Tensor]], key: str) -> Kept:
    """The buffers kept for ``key`` as a :class:`~distckpt.hostcopy.Kept` (which also remembers the
    bulk copy's columns); buffers the general encoder kept in a plain dict move into one."""
    held = buffers.get(key)
    if type(held) is not Kept:
        held = buffers[key] = Kept(held or {})
    return held


def _parts(copy: StateCopy, files: Sequence[FilePlan],
           plan_files: Sequence[FilePlan]) -> tuple[set[int] | None, list[tuple[str, Callable[[], list[memoryview]]]]]:
    """What this rank copies of a balanced write: the ``data_ptr()`` of the copy's tensors in its
    own parts (``None``: all, for a whole file), and the other members' parts whose checksums it
    predicts (part 0's writer): ``(path, chunks)``, ``chunks()`` giving the bytes of that part
    file as the live state holds them, to hash instead of copying them.

    Local, on the caller's thread before the save returns; the caller hashes the chunks before
    it returns too (the live state is still as it was when the snapshot began). A part holding
    a tensor whose bytes are not laid out as written (not contiguous, on a GPU, lazily
    conjugated) is copied instead and predicted in the background.
    """
    if any(f.parts == 1 for f in files):
        return None, []
    copy.allocate()
    encoded = encode(copy.state)  # shapes only: which tensors each part holds (the split is deterministic)
    sources = {t.data_ptr(): s for t, s in zip(copy.targets, copy.sources, strict=True)}
    own: set[int] = set()
    hashed: list[tuple[str, Callable[[], list[memoryview]]]] = []
    for f in files:
        pieces = encoded.split(f.parts)
        own.update(t.data_ptr() for t in pieces[f.part].tensors if t.numel())
        if f.part != 0:
            continue
        for sibling in plan_files:
            if sibling.ranks != f.ranks or sibling.part == 0:
                continue
            piece = pieces[sibling.part]
            live = [sources.get(t.data_ptr(), t) for t in piece.tensors if t.numel()]
            if all(t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()) for t in live):
                hashed.append((sibling.path, partial(_chunks, piece.header, live)))
            else:
                own.update(t.data_ptr() for t in piece.tensors if t.numel())
    return own, hashed


def _chunks(header: bytes, live: list[torch.Tensor]) -> list[memoryview]:
    """The bytes of a part file: its header, then each tensor's bytes as they lie."""
    return [memoryview(header), *map(tensor_bytes, live)]
