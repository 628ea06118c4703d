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
from .codec import encode, state_nbytes, tensor_bytes
from .components import StateComponent
from .errors import StateChangedError
from .handle import SaveHandle
from .hashing import BackgroundChecksums
from .hostcopy import Kept, StateCopy, Unsupported
from .hostwalk import entry_path
from .layout import FilePlan
from .planning import Job, Produce, SavePlan
from .snapshots import Snapshot, SnapshotBudget
from .transport import Comm, ForkingComm, check_comm

__all__ = ["AsyncSaves", "Walks", "snapshot"]

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

        Returns at once with the :class:`SaveHandle`. A producer with a ``stage`` (staged in
        the background) is copied by a second non-daemon thread, which marks the handle staged
        when done (:meth:`SaveHandle.wait_staged`). On failure of the
        thread, rank 0 removes the staging directory and the handle holds the error.
        """
        background = self.channel(comm)
        produce = snapshot(self.snapshots)
        pump = getattr(produce, "pump", None)  # snapshots beyond the memory budget stream (distckpt.snapshots)
        stage = getattr(produce, "stage", None)  # staged in the background: copied on a thread of its own
        handle = SaveHandle(plan.path, staged=stage is None,
                            confirm=getattr(produce, "confirm", None) if stage is not None else None)
        log.debug("distckpt: %s %s in %.3f s; writing in the background", plan.path,
                  "walked" if stage is not None else "snapshotted", time.perf_counter() - started)

        abort = getattr(produce, "abort", None) or (lambda: None)  # releases a pump the writer no longer serves

        def run() -> None:
            try:
                finish(background, produce)
            except BaseException as exc:
                if comm.rank == 0:
                    folder.discard_staging(plan.staging)
                handle._finish(exc)
            else:
                handle._finish(None)
            finally:  # the write phase may end without asking for a single file (a hook, another rank)
                abort()

        def run_stage() -> None:
            try:
                stage()  # type: ignore[misc]
            finally:
                handle._staged.set()

        self.pending = handle
        try:  # the stager first: a writer started alone would wait for its copies forever
            if stage is not None:
                threading.Thread(target=run_stage, name=f"distckpt-stage-{plan.checkpoint_id}", daemon=False).start()
            threading.Thread(target=run, name=f"distckpt-save-{plan.checkpoint_id}", daemon=False).start()
        except BaseException as exc:  # no thread (or an interrupt): this call raises it, nothing waits for it
            abort()
            self.pending = None
            handle._observed = True
            handle._finish(exc)
            raise
        if pump is not None:
            pump()  # returns once every file is copied; the thread writes them meanwhile
        return handle

    def wait(self) -> str | None:
        """Finish the pending save: its path, ``None`` if there was none (or its error was already
        raised by :meth:`SaveHandle.result`); raises its error otherwise."""
        handle, self.pending = self.pending, None
        return None if handle is None else handle._settle()


class Walks:
    """The walks (:class:`~distckpt.hostcopy.StateCopy`) of one asynchronous save's states, each
    taken once, reusing the buffers kept from the last snapshot.

    The plan phase asks :meth:`size_of` where this rank's size decides a balanced write (it is
    the lowest rank of a replica set, and writes part 0 of it), so that rank walks its state once
    for both the plan and the snapshot (:func:`snapshot` takes :meth:`copy`). Local; called on
    the caller's thread of ``save_checkpoint(async_save=True)``.
    """

    def __init__(self, states: saving.States, buffers: dict[str, dict[int, torch.Tensor]]) -> None:
        self._states = states
        self._buffers = buffers
        self._copies: dict[str, StateCopy | Unsupported] = {}

    def copy(self, key: str) -> StateCopy:
        """The walk of ``key``'s state; raises :class:`~distckpt.hostcopy.Unsupported` (again, for a
        state the copy does not know)."""
        if key not in self._copies:
            try:
                self._copies[key] = StateCopy(self._states(key), _kept(self._buffers, key))
            except Unsupported as exc:
                self._copies[key] = exc
        walked = self._copies[key]
        if isinstance(walked, Unsupported):
            raise walked
        return walked

    def size_of(self, key: str) -> int:
        """``codec.state_nbytes`` of ``key``'s state, from its walk when every tensor is plain."""
        try:
            walked = self.copy(key)
        except Unsupported:
            walked = None
        return walked.nbytes if walked is not None and walked.plain_nbytes else state_nbytes(self._states(key))


class _Copied(saving.States):
    """The states the background encoder reads: this rank's copies, once filled."""

    def __init__(self, snap: Snapshot) -> None:
        super().__init__({})
        self._snap = snap

    def __call__(self, key: str) -> Any:
        return self._snap.state(key)


def snapshot(rank: int, components: Sequence[StateComponent], plan: SavePlan, states: saving.States,
             buffers: dict[str, dict[int, torch.Tensor]], budget: int | None, background: bool = False,
             walks: Walks | None = None) -> Produce:
    """This rank's files of an asynchronous save: the states it writes copied, encoded later.

    Called on the caller's thread by :meth:`AsyncSaves.start` (through the
    coordinator). Walks every state this rank writes (:class:`StateCopy`:
    one walk, then one batched copy into ``buffers`` kept from the last
    snapshot) and returns the write phase's producer, which encodes the copies in the
    background thread exactly as a synchronous save encodes the live state.
    The writer of one part of a balanced write copies only that part (part 0's
    writer hashes the other parts from the live state, for its prediction of their checksums).
    Beyond ``budget`` bytes the copies stream (:class:`Snapshot`; the producer has a
    ``pump``, run by :meth:`AsyncSaves.start`).

    The copy and the hashing happen before this returns, unless ``background``: then only the
    walk does, with every live tensor's version counter remembered, and the producer has a
    ``stage`` that copies and hashes (on a thread of :meth:`AsyncSaves.start`) and fails the
    save with :class:`~distckpt.errors.StateChangedError` if a tensor changed meanwhile.
    ``walks``: the save's :class:`Walks` (a state the plan phase already walked is not walked again).

    A state the copy does not know (a tensor subclass other than DTensor, say) takes the general path,
    :func:`distckpt.saving.encoder`, copied before this returns. Local; an error is not raised
    here but by the producer, inside the write phase, so every rank hears it.
    """
    files: dict[str, list[Any]] = {}
    for c in components:
        mine = [f for f in plan.components[c.key].files if f.writer == rank]
        if mine:
            files[c.key] = mine
    try:
        try:
            walks = walks if walks is not None else Walks(states, buffers)
            copies = {key: walks.copy(key) for key in files}
        except Unsupported:
            return saving.encoder(rank, components, plan, states, buffers, budget)
        if background and not all([copy.watch() for copy in copies.values()]):
            for copy in copies.values():
                copy.unwatch()  # a tensor without a version counter: copied before the call returns
            background = False
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
        # the other members' parts are hashed from the live bytes in a worker (xxhash releases the
        # GIL) while this thread copies, and always before the live state may change again
        hashing = BackgroundChecksums(siblings)

        def predict() -> dict[str, dict[str, str]]:
            predicted: dict[str, dict[str, str]] = {key: {} for key in files}
            for path, checksum in hashing.result().items():
                predicted[owner[path]][path] = checksum
            return predicted

        snap = Snapshot(copies, only, {key: len(fs) for key, fs in files.items()},
                        SnapshotBudget(budget) if streams and budget is not None else None, predict)
        produce = snap.produce(saving.encoder(rank, components, plan, _Copied(snap)))
        produce.abort = snap.abort  # type: ignore[attr-defined]
        produce.confirm = snap.confirm  # type: ignore[attr-defined]
        if background:
            produce.stage = partial(_stage, snap, copies, hashing, states)  # type: ignore[attr-defined]
            return produce
        try:
            if not streams:
                snap.pump()
            snap.predictions()
        finally:
            hashing.cancel()  # (done by now, unless the copy was interrupted)
        if streams:
            produce.pump = partial(_pump_then_staged, snap)  # type: ignore[attr-defined]
        else:
            snap.staged()
        return produce
    except Exception as exc:  # reported through the write phase, so every rank hears it
        error = exc

        def failed() -> Iterator[Job]:
            raise error
        return failed


def _pump_then_staged(snap: Snapshot) -> None:
    """The caller's streaming copy (the save returns after it)."""
    try:
        snap.pump()
    finally:
        snap.staged()


def _stage(snap: Snapshot, copies: dict[str, StateCopy], hashing: BackgroundChecksums,
           states: saving.States) -> None:
    """A snapshot staged in the background: copy and hash (on a thread of
    :meth:`AsyncSaves.start`, while the writer writes what is copied), then check that no live
    tensor changed since the walk, and again once every file is written (an in-place change
    still running while the copy ended is counted by torch only when it finishes). Never
    raises: every outcome reaches the writer through :meth:`Snapshot.staged` (a copy that
    failed, through the copy's own key)."""
    error: BaseException | None = None
    try:
        snap.pump()
        snap.predictions()
        error = _changed(copies, states)
    except BaseException as exc:  # reaches the writer (an interrupt too: it must not wait forever)
        error = exc
    finally:
        hashing.cancel()
        snap.staged(error, recheck=partial(_changed, copies, states))


def _changed(copies: dict[str, StateCopy], states: saving.States) -> StateChangedError | None:
    """:class:`StateChangedError` naming the first live tensor changed in place since the walk,
    or ``None``. (The copies keep the live tensors for this until the save is let go of.)"""
    for key, copy in copies.items():
        changed = copy.changed()
        if changed:
            path = entry_path(states(key), changed[0])
            entry = f"entry {path!r}" if path is not None else "a tensor"
            more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
            return StateChangedError(
                f"component {key!r}: {entry}{more} changed in place before SaveHandle.wait_staged() "
                "returned, while the asynchronous save staged in the background could still be copying "
                "it; call wait_staged() before changing the state (an optimizer step, a scheduler "
                "holding tensors, a module in training mode); nothing was committed")
    return None


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
