"""CheckpointCoordinator: the facade of one collective save and one collective load.

Called by the user's training script on every rank. This module holds the
construction checks and the public calls; each call runs named phases that
live in their own modules, each phase ending in an error-carrying collective
(:func:`~distckpt.collectives.exchange`), so a failure anywhere is raised
everywhere at the same step:

- save: **plan** (:func:`distckpt.saving.plan`; rank 0 allocates path, id and
  sequence with :func:`distckpt.series.allocate`), **validate** (only when a
  component asks for it; :mod:`distckpt.validation`), **write** and **commit**
  (:func:`distckpt.saving.write_and_commit`: rank 0 writes the manifest last,
  renames staging into place and applies retention, :func:`distckpt.series.retain`).
  With ``async_save=True`` write and commit run in a background thread on a
  channel of their own (:mod:`distckpt.asyncsave`), after this rank's files
  were snapshotted to host memory.
- load: **resolve** (rank 0 finds the checkpoint and parses the manifest;
  every rank checks compatibility before any data is read) and **read**
  (every rank reads its replica set's file, into its live tensors where they
  match); :mod:`distckpt.loading`.

The number of collectives does not depend on the number of components.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, overload

from . import asyncsave, folder, loading, saving, series, validation
from .arguments import call_args, checked_components, checked_settings, normalise_groups
from .asyncsave import AsyncSaves
from .codec import state_nbytes
from .components import StateComponent
from .handle import SaveHandle
from .loading import LOAD_STRATEGIES
from .logs import note
from .planning import Produce, SavePlan, local_report, validated_components
from .planreports import AgreedWorld
from .progress import Progress
from .report import LoadReport
from .snapshots import DEFAULT_SNAPSHOT_BYTES
from .transport import Comm, ForkingComm, SetBroadcastComm, check_comm, default_comm

__all__ = ["DEFAULT_MIN_PART_BYTES", "LOAD_STRATEGIES", "CheckpointCoordinator", "PhaseHook"]

log = logging.getLogger("distckpt")

PhaseHook = Callable[[str, int], None]
#: Default smallest part of a balanced write (measured: bench/results/FINDINGS.md).
DEFAULT_MIN_PART_BYTES = 256 * 1024 * 1024


class CheckpointCoordinator:
    """Saves and loads declared state components across a distributed world.

    Every rank constructs the coordinator with the same declarations (in any
    order) and calls :meth:`save_checkpoint` and :meth:`load_checkpoint`
    together. Construction is collective when torch.distributed is in use (it
    creates a dedicated gloo group for the coordinator's own collectives).

    Args:
        state_components: the declarations; keys must be unique ignoring case.
        process_groups: ``{name: ProcessGroup}`` or a ``DeviceMesh`` whose
            dimension names become group names; needed for PER_GROUP.
        dist: a :class:`~distckpt.transport.Comm`, or ``None`` to use
            torch.distributed when initialized, else a world of one process.
        output_dir: checkpoints live in ``<output_dir>/checkpoints/``.
        keep_last: keep only this many newest committed checkpoints there.
        timeout: seconds any rank waits for its peers in one collective.
        phase_hook: called as ``hook(phase, rank)`` at the start of every
            phase on every rank (observability and fault injection); an
            exception it raises fails the phase like any other.
        min_part_bytes: balanced writes. A REPLICATED or PER_GROUP replica
            set holding at least twice this many bytes is written as parts,
            none smaller than this and at most one per member, written in
            parallel by members taken node by node (each node's lowest rank
            first). ``None`` writes every set as one file. Default 256 MiB
            (measured: ``bench/results/FINDINGS.md``).
        load_in_place: read tensors straight into the component's current
            ``state_dict()`` tensors where path, dtype and shape match (no
            second buffer, no copy). After a failed load those tensors hold
            unverified bytes; the load raises on every rank either way.
        load_strategy: ``"every_member_reads"`` (default: each rank reads its
            replica set's file; measured fastest on one machine, where the
            page cache beats gloo) or ``"read_and_broadcast"`` (the lowest
            rank of each set reads and verifies, then broadcasts the bytes
            within the set over gloo: fewer reads of a shared file, e.g. a
            cold parallel file system). Both give the same state.
        async_snapshot_bytes: host memory this rank's ``async_save``
            snapshot may hold. A snapshot within it is copied whole before
            the call returns and its buffers are kept for the next save; a
            larger one streams: the call copies file after file while the
            background thread writes them, waiting for the disk whenever the
            copies not yet written would exceed the budget (a single larger
            file is copied alone). ``None``: no bound. Default 8 GiB
            (:data:`distckpt.snapshots.DEFAULT_SNAPSHOT_BYTES`).
        direct_io: write checkpoint files around the page cache
            (``O_DIRECT``, in 4 KiB units, where the file system allows it;
            elsewhere ordinary writes). Same files and checksums. For
            machines where buffered writes of large states stall from one
            save to the next (measured: ``bench/results/FINDINGS.md``); a
            load right after such a save reads the disk, not the cache.
            Default off. A per-rank choice: ranks need not agree.
    """

    def __init__(
        self,
        state_components: Iterable[StateComponent],
        process_groups: Mapping[str, Any] | Any | None = None,
        dist: Comm | Any | None = None,
        output_dir: str | os.PathLike[str] = ".",
        *,
        keep_last: int | None = None,
        timeout: float | _dt.timedelta = 300.0,
        phase_hook: PhaseHook | None = None,
        min_part_bytes: int | None = DEFAULT_MIN_PART_BYTES,
        load_in_place: bool = True,
        load_strategy: str = "every_member_reads",
        async_snapshot_bytes: int | None = DEFAULT_SNAPSHOT_BYTES,
        direct_io: bool = False,
    ) -> None:
        if async_snapshot_bytes is not None and (type(async_snapshot_bytes) is not int or async_snapshot_bytes < 1):
            raise ValueError(f"async_snapshot_bytes: expected a positive int or None, got {async_snapshot_bytes!r}")
        self.async_snapshot_bytes = async_snapshot_bytes
        components = checked_components(state_components)
        seconds = checked_settings(keep_last, min_part_bytes, load_strategy, timeout)
        self.components: tuple[StateComponent, ...] = tuple(sorted(components, key=lambda c: c.key))
        self.output_dir = os.fspath(output_dir)
        self.keep_last = keep_last
        self.timeout = seconds
        self.phase_hook = phase_hook
        self.min_part_bytes = min_part_bytes
        self.load_in_place = bool(load_in_place)
        self.load_strategy = load_strategy
        self.direct_io = bool(direct_io)
        self._groups = normalise_groups(process_groups)
        self._comm = default_comm(dist, seconds)
        if load_strategy == "read_and_broadcast":
            check_comm(self._comm, SetBroadcastComm, "load_strategy='read_and_broadcast'")
        self._async = AsyncSaves()
        self._agreed: AgreedWorld | None = None  # the last save's world: the next plans in one round
        self._by_key = {c.key: c for c in self.components}

    # ------------------------------------------------------------------ public

    @property
    def rank(self) -> int:
        return self._comm.rank

    @property
    def world_size(self) -> int:
        return self._comm.world_size

    @property
    def checkpoints_dir(self) -> str:
        """``<output_dir>/checkpoints``: where default paths, "latest" and retention apply."""
        return os.path.join(self.output_dir, "checkpoints")

    def latest_checkpoint(self) -> str | None:
        """Path of the newest committed checkpoint under ``checkpoints_dir``, or ``None``. Local."""
        return series.latest_committed(self.checkpoints_dir)

    @overload
    def save_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = ..., checkpoint_id: str | int | None = ...,
        validate: bool = ..., *, overwrite: bool = ..., async_save: Literal[False] = ..., progress: bool = ...,
        background_staging: Literal[False] = ...,
    ) -> str: ...

    @overload
    def save_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = ..., checkpoint_id: str | int | None = ...,
        validate: bool = ..., *, overwrite: bool = ..., async_save: Literal[True], progress: bool = ...,
        background_staging: bool = ...,
    ) -> SaveHandle: ...

    def save_checkpoint(
        self,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_id: str | int | None = None,
        validate: bool = False,
        *,
        overwrite: bool = False,
        async_save: bool = False,
        progress: bool = False,
        background_staging: bool = False,
    ) -> str | SaveHandle:
        """Collective: save every component and return the committed path (same on every rank).

        ``checkpoint_path`` defaults to ``<output_dir>/checkpoints/checkpoint-<id>``;
        ``checkpoint_id`` defaults to the next sequence number. ``validate``
        validates every component that has replicas, at its level, on top of
        those declared with ``validate_replication``. An existing committed
        checkpoint is replaced only with ``overwrite=True``.

        With ``async_save=True`` the call returns a :class:`SaveHandle` as soon
        as this rank's files are snapshotted to host memory (after plan and
        validation); writing and commit go on in a background thread on a
        channel of their own. A pending asynchronous save is always finished
        (and its error raised) before the next save or load starts.

        ``background_staging=True`` (with ``async_save``) returns sooner: once
        the state has been walked, with the copy to host memory going on in
        the background too. The trainer may run its forward and backward pass
        meanwhile, but must call :meth:`SaveHandle.wait_staged` before anything
        changes the saved tensors in place (an optimizer step, a module whose
        forward updates its buffers). A tensor changed before then fails the
        save on every rank with :class:`~distckpt.errors.StateChangedError`
        (torch's version counters tell; a change through ``.data`` is not
        seen), never a torn checkpoint.

        On any failure on any rank, every rank raises the same
        :class:`CheckpointError` subclass naming the failing ranks, nothing
        becomes visible, and earlier checkpoints are untouched. Every rank must
        pass the same arguments: they travel in the first collective, and any
        difference raises :class:`~distckpt.errors.ArgumentMismatchError`.

        ``progress=True`` shows a progress bar on rank 0 (tqdm if installed,
        else log lines); writes that take more than a few seconds are logged
        either way (:mod:`distckpt.progress`).
        """
        self.wait()
        if background_staging and not async_save:
            raise ValueError("background_staging=True needs async_save=True")
        if async_save:
            check_comm(self._comm, ForkingComm, "async_save")
        started = time.perf_counter()
        states = saving.States(self._by_key)
        walks = asyncsave.Walks(states, self._async.snapshots) if async_save else None
        args = call_args(checkpoint_path=checkpoint_path, checkpoint_id=checkpoint_id, validate=validate,
                          async_save=async_save, overwrite=overwrite)
        plan = saving.plan(
            self._comm, self.components, self._local_report, states,
            allocate=lambda create: series.allocate(self.checkpoints_dir, checkpoint_path, checkpoint_id,
                                                    overwrite, self.timeout / 2, create),
            min_part_bytes=self.min_part_bytes, hook=self._hook, args=args,
            size_of=walks.size_of if walks is not None else None, agreed=self._agreed,
        )
        self._agreed = plan.agreed
        try:
            validation.validate(self._comm, plan, validated_components(self.components, validate), states,
                                self._hook)
            meter = Progress("write", self.rank, lambda: _share(self.rank, self.components, plan, states),
                             bar=progress)
            if async_save:
                return self._async.start(
                    self._comm, plan,
                    lambda buffers: asyncsave.snapshot(self.rank, self.components, plan, states, buffers,
                                                       self.async_snapshot_bytes, bool(background_staging), walks),
                    lambda comm, produce: self._write_and_commit(comm, plan, produce, validate, overwrite, started,
                                                                 meter),
                    started,
                )
            self._write_and_commit(self._comm, plan, saving.encoder(self.rank, self.components, plan, states),
                                   validate, overwrite, started, meter)
        except BaseException:
            if self.rank == 0:
                folder.discard_staging(plan.staging)
            raise
        return plan.path

    def wait(self) -> str | None:
        """Finish a pending asynchronous save: its path, or ``None`` if there was none
        (or it failed and :meth:`SaveHandle.result` already raised its error).

        Raises the save's error otherwise (the same on every rank). Called by
        every save and load; call it before a trainer that saved
        asynchronously exits.
        """
        return self._async.wait()

    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = None, strict: bool = True, *,
        missing_ok: bool = False, progress: bool = False,
    ) -> LoadReport:
        """Collective: restore every declared component from a checkpoint.

        ``checkpoint_path=None`` loads the newest committed checkpoint under
        ``checkpoints_dir``. Compatibility (components, patterns, partitions)
        is checked on every rank before any data is read. ``strict`` also
        rejects components in the checkpoint that nobody declared. On any
        failure every rank raises the same :class:`CheckpointError` subclass;
        if the read phase failed, its message names each rank and the
        components whose live state it had already changed. Arguments that
        differ across ranks raise :class:`~distckpt.errors.ArgumentMismatchError`.

        Before any byte is read, every saved tensor's shape (and with
        ``strict``, its dtype and each mapping's tensor keys) is compared with
        the live ``state_dict()``; a difference raises
        :class:`~distckpt.errors.StateMismatchError` on every rank.
        ``missing_ok=True``: when there is no checkpoint to load (none
        committed, or no directory at ``checkpoint_path``), every rank returns
        a report whose ``loaded`` is empty instead of raising (the resume
        idiom). ``progress=True``: as for :meth:`save_checkpoint`.
        """
        self.wait()
        started = time.perf_counter()
        args = call_args(checkpoint_path=checkpoint_path, strict=strict, missing_ok=missing_ok)
        path, manifest, topology, unlisted = loading.resolve(
            self._comm, self._local_report,
            lambda: loading.find(checkpoint_path, self.checkpoints_dir, self.latest_checkpoint, missing_ok),
            strict, self._hook, args,
        )
        if not path:
            note(self.rank, "resolve", "no checkpoint to load under %s; starting fresh",
                 checkpoint_path if checkpoint_path is not None else self.checkpoints_dir)
            return LoadReport(path="", checkpoint_id="", loaded=())
        if manifest is None:
            report = loading.read_legacy(self._comm, path, topology, self.components, strict, self._hook)
        else:
            actions, skipped = loading.compatible_everywhere(self._comm, path, manifest, topology,
                                                             self.components, strict)
            report = loading.read(self._comm, path, manifest, actions, skipped, self._by_key,
                                  in_place=self.load_in_place, strategy=self.load_strategy, hook=self._hook,
                                  bar=progress)
            report = dataclasses.replace(report, unlisted=tuple(unlisted))
        note(self.rank, "read", "loaded %s (%d components, %d skipped) in %.3f s", path,
             len(report.loaded), len(report.skipped), time.perf_counter() - started)
        return report

    # ------------------------------------------------------------ the phases' inputs

    def _hook(self, phase: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(phase, self.rank)

    def _local_report(self, full: bool = False) -> Any:
        groups = {name: self._comm.group_members(pg) for name, pg in self._groups.items()}
        return local_report(self._comm.node_id(), groups, self.components, full)

    def _write_and_commit(self, comm: Comm, plan: SavePlan, produce: Produce, validate: bool, overwrite: bool,
                          started: float, meter: Progress | None = None) -> None:
        validated = {c.key: c.validation_level.value for c in validated_components(self.components, validate)}
        saving.write_and_commit(
            comm, plan, produce, self.components, validated, overwrite=overwrite, wait_s=self.timeout / 2,
            hook=self._hook, retain=lambda path: series.retain(self.checkpoints_dir, path, self.keep_last),
            started=started, meter=meter, direct=self.direct_io,
        )


def _share(rank: int, components: Sequence[StateComponent], plan: SavePlan, states: saving.States) -> int:
    """About how many bytes this rank writes in a save (its progress total): tensor bytes per file.
    Asked by the progress meter inside the write phase, where the states are asked for anyway."""
    return sum(state_nbytes(states(c.key)) // f.parts for c in components
               for f in plan.components[c.key].files if f.writer == rank)
