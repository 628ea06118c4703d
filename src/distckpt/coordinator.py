"""CheckpointCoordinator: one collective save and one collective load.

A save runs named phases, each ending in an error-carrying all-gather
(:func:`~distckpt.collectives.exchange`), so a failure anywhere is raised
everywhere at the same step:

1. **plan**: rank 0 fixes path, id and sequence and creates the staging
   directory; every rank reports its node, groups and declarations; every rank
   checks agreement and derives the same file plan.
2. **validate** (only when a component asks for it): replica digests are
   compared member against member; the verdict is identical on every rank.
3. **write**: the lowest rank of every replica set writes that set's file
   into staging, hashing while writing (a balanced write: several members of
   a large set write one part each, taken node by node).
4. **commit**: every rank votes; only then does rank 0 write the manifest last,
   rename staging to the final name, apply retention, and report back.

With ``async_save=True`` phases 3 and 4 run in a background thread on a
channel of their own, after this rank's files were snapshotted to host memory.

A load runs **resolve** (rank 0 finds the checkpoint and parses the manifest;
every rank checks compatibility before any data is read) and **read** (every
rank reads its replica set's file, into its live tensors where they match). The
number of collectives does not depend on the number of components.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

from . import __version__, storage
from .codec import EncodedState, encode, state_nbytes, tensor_bytes
from .collectives import Comm, announce, default_comm, exchange
from .components import StateComponent, ValidationLevel
from .digests import Mismatch, compare_replicas, describe_difference, digest_state, iter_leaves
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ComponentMismatchError,
    IntegrityError,
    ManifestError,
    ReplicationMismatchError,
    TopologyMismatchError,
)
from .handle import SaveHandle
from .layout import ComponentPlan, plan_component
from .legacy import is_legacy_checkpoint, load_legacy
from .manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest, FileEntry
from .names import check_name
from .patterns import Pattern, pattern_from_record
from .reading import decode_files, read_component, read_files
from .report import LoadReport
from .topology import Topology

__all__ = ["CheckpointCoordinator"]

log = logging.getLogger("distckpt")

PhaseHook = Callable[[str, int], None]
#: key, relative path, encoded file, structure digest (parts only), and for the writer of a
#: balanced write's part 0 the other parts of its own replica (paths and bytes), to predict their checksums
_Job = tuple[str, str, EncodedState, str, tuple[tuple[str, EncodedState], ...]]
_Record = tuple[int, str, int, str]  # size, checksum, writer, structure digest
_DETAIL_LIMIT_BYTES = 64 * 1024 * 1024
#: Default smallest part of a balanced write (measured: bench/results/FINDINGS.md).
DEFAULT_MIN_PART_BYTES = 256 * 1024 * 1024
LOAD_STRATEGIES = ("every_member_reads", "read_and_broadcast")


@dataclass(frozen=True)
class _SavePlan:
    path: str
    staging: str
    checkpoint_id: str
    sequence: int
    timestamp: str
    topology: Topology
    components: Mapping[str, ComponentPlan]


def _declaration(c: StateComponent) -> tuple[Any, ...]:
    return (c.key, c.pattern.describe(), c.required, c.validate_replication, c.validation_level.value)


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
        dist: a :class:`~distckpt.collectives.Comm`, or ``None`` to use
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
    ) -> None:
        components = list(state_components)
        seen: dict[str, str] = {}
        for c in components:
            if not isinstance(c, StateComponent):
                raise TypeError(f"state_components: expected StateComponent, got {type(c).__name__}")
            folded = c.key.casefold()
            if folded in seen:
                raise ValueError(
                    f"state_components: keys {seen[folded]!r} and {c.key!r} collide "
                    "(keys must be unique ignoring case)"
                )
            seen[folded] = c.key
        if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
            raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
        if min_part_bytes is not None and (type(min_part_bytes) is not int or min_part_bytes < 1):
            raise ValueError(f"min_part_bytes: expected a positive int or None, got {min_part_bytes!r}")
        if load_strategy not in LOAD_STRATEGIES:
            raise ValueError(f"load_strategy: expected one of {list(LOAD_STRATEGIES)}, got {load_strategy!r}")
        seconds = timeout.total_seconds() if isinstance(timeout, _dt.timedelta) else float(timeout)
        if seconds <= 0:
            raise ValueError(f"timeout: expected a positive duration, got {timeout!r}")
        self.components: tuple[StateComponent, ...] = tuple(sorted(components, key=lambda c: c.key))
        self.output_dir = os.fspath(output_dir)
        self.keep_last = keep_last
        self.timeout = seconds
        self.phase_hook = phase_hook
        self.min_part_bytes = min_part_bytes
        self.load_in_place = bool(load_in_place)
        self.load_strategy = load_strategy
        self._groups = _normalise_groups(process_groups)
        self._comm = default_comm(dist, seconds)
        self._async_comm: Comm | None = None
        self._pending: SaveHandle | None = None
        # Host buffers of the last asynchronous snapshot, reused by the next one.
        self._snapshots: dict[str, dict[int, torch.Tensor]] = {}
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
        committed = [e for e in storage.list_checkpoints(self.checkpoints_dir) if e.committed]
        return committed[-1].path if committed else None

    @overload
    def save_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = ..., checkpoint_id: str | int | None = ...,
        validate: bool = ..., *, overwrite: bool = ..., async_save: Literal[False] = ...,
    ) -> str: ...

    @overload
    def save_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = ..., checkpoint_id: str | int | None = ...,
        validate: bool = ..., *, overwrite: bool = ..., async_save: Literal[True],
    ) -> SaveHandle: ...

    def save_checkpoint(
        self,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_id: str | int | None = None,
        validate: bool = False,
        *,
        overwrite: bool = False,
        async_save: bool = False,
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

        On any failure on any rank, every rank raises the same
        :class:`CheckpointError` subclass naming the failing ranks, nothing
        becomes visible, and earlier checkpoints are untouched. Every rank must
        pass the same arguments: they travel in the first collective, and any
        difference raises :class:`~distckpt.errors.ArgumentMismatchError`.
        """
        self.wait()
        started = time.perf_counter()
        states: dict[str, Any] = {}
        args = _call_args(checkpoint_path=checkpoint_path, checkpoint_id=checkpoint_id, validate=validate,
                          async_save=async_save, overwrite=overwrite)
        plan = self._plan_save(checkpoint_path, checkpoint_id, overwrite, states, args)
        try:
            self._validate(plan, validate, states)
            if async_save:
                return self._start_async(plan, states, validate, overwrite, started)
            self._write_and_commit(self._comm, plan, self._encoder(plan, states, copy=False),
                                   validate, overwrite, started)
        except BaseException:
            if self.rank == 0:
                _remove_tree(plan.staging)
            raise
        return plan.path

    def wait(self) -> str | None:
        """Finish a pending asynchronous save: its path, or ``None`` if there was none
        (or it failed and :meth:`SaveHandle.result` already raised its error).

        Raises the save's error otherwise (the same on every rank). Called by
        every save and load; call it before a trainer that saved
        asynchronously exits.
        """
        handle, self._pending = self._pending, None
        return None if handle is None else handle._settle()

    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike[str] | None = None, strict: bool = True
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
        """
        self.wait()
        started = time.perf_counter()
        args = _call_args(checkpoint_path=checkpoint_path, strict=strict)
        path, manifest, topology, unlisted = self._resolve(checkpoint_path, strict, args)
        if manifest is None:
            report = self._read_legacy(path, topology, strict)
        else:
            actions, skipped = self._compatible_everywhere(path, manifest, topology, strict)
            report = self._read(path, manifest, actions, skipped)
            report = dataclasses.replace(report, unlisted=tuple(unlisted))
        log.info("distckpt: loaded %s (%d components, %d skipped) in %.3f s", path,
                 len(report.loaded), len(report.skipped), time.perf_counter() - started)
        return report

    # ------------------------------------------------------------ save phases

    def _hook(self, phase: str) -> None:
        if self.phase_hook is not None:
            self.phase_hook(phase, self.rank)

    def _local_report(self) -> dict[str, Any]:
        return {
            "node": self._comm.node_id(),
            "groups": {name: self._comm.group_members(pg) for name, pg in self._groups.items()},
            "declarations": [_declaration(c) for c in self.components],
        }

    def _agree(self, reports: Sequence[Mapping[str, Any]]) -> Topology:
        """Every rank: check declarations agree, then build the topology. Deterministic."""
        declared = [tuple(r["declarations"]) for r in reports]
        if any(d != declared[0] for d in declared):
            raise ComponentMismatchError(
                "ranks declared different components; every rank must declare the same keys, "
                "patterns, groups and validation",
                failures={rank: _diff_declarations(declared[0], d) for rank, d in enumerate(declared)
                          if d != declared[0]},
            )
        return Topology.from_reports([r["node"] for r in reports], [r["groups"] for r in reports])

    def _plan_save(self, checkpoint_path: Any, checkpoint_id: Any, overwrite: bool,
                   states: dict[str, Any], args: Mapping[str, Any]) -> _SavePlan:
        mine: dict[str, Any] = {}

        def work() -> dict[str, Any]:
            self._hook("plan")
            report = self._local_report()
            if self.min_part_bytes is not None and self.world_size > 1:  # sizes decide balanced writes
                report["sizes"] = {c.key: state_nbytes(self._state(states, c.key))
                                   for c in self.components if c.pattern.identical_replicas}
            if self.rank == 0:
                report["decision"] = mine["decision"] = self._decide_path(checkpoint_path, checkpoint_id, overwrite)
            return report

        try:
            reports = exchange(self._comm, "plan", work, agree=args)
            decision = reports[0]["decision"]
            topology = self._agree(reports)
            plans = self._plan_files(topology, reports)
        except BaseException:
            if "decision" in mine:
                _remove_tree(mine["decision"]["staging"])
            raise
        return _SavePlan(topology=topology, components=plans, **decision)

    def _plan_files(self, topology: Topology, reports: Sequence[Mapping[str, Any]]) -> dict[str, ComponentPlan]:
        """Every rank: each component's files from its pattern, inside a collective so that a
        pattern that raises, or answers differently on some rank, fails every rank."""
        plans: dict[str, ComponentPlan] = {}

        def work() -> str:
            for c in self.components:
                sizes = {r: rep.get("sizes", {}).get(c.key, 0) for r, rep in enumerate(reports)}
                plans[c.key] = plan_component(topology, c.key, c.pattern, sizes=sizes,
                                              min_part_bytes=self.min_part_bytes)
            return _plan_digest(plans)

        digests = exchange(self._comm, "plan", work)
        _check_same_plan(digests, self.components)
        return plans

    def _decide_path(self, checkpoint_path: Any, checkpoint_id: Any, overwrite: bool) -> dict[str, Any]:
        """Rank 0 only: final path, id, sequence and a fresh staging directory this process owns.

        All under the folder lock, so two saves (of this job or another job
        sharing the folder) never claim one name or one sequence number: the
        sequence is one past every committed checkpoint and every live save,
        and a default id skips every name that is taken. Raises
        :class:`CheckpointExistsError` for a name that is committed (without
        ``overwrite``) or that a live save is writing, and
        :class:`CheckpointBusyError` when the folder lock is held too long.
        """
        if checkpoint_path is not None:
            final = os.path.abspath(os.fspath(checkpoint_path))
            parent = os.path.dirname(final)
        else:
            parent = os.path.abspath(self.checkpoints_dir)
        if checkpoint_id is not None:
            check_name(str(checkpoint_id), field_name="checkpoint_id")
        storage.prepare_folder(parent)
        with storage.folder_lock(parent, self.timeout / 2):
            storage.clean_stale(parent)
            live = storage.live_saves(parent)
            sequence = max([e.manifest.sequence for e in storage.list_checkpoints(parent) if e.manifest]
                           + [owner.sequence for owner in live.values()], default=0) + 1
            if checkpoint_path is not None:
                cid = str(checkpoint_id) if checkpoint_id is not None else os.path.basename(final)
            elif checkpoint_id is not None:
                cid = str(checkpoint_id)
                final = os.path.join(parent, f"checkpoint-{cid}")
            else:  # the default id: a free name, never one that is taken
                sequence = storage.first_free(parent, sequence, lambda n: f"checkpoint-{n}", set(live))
                cid = str(sequence)
                final = os.path.join(parent, f"checkpoint-{cid}")
            check_name(os.path.basename(final), field_name="checkpoint_path")
            check_name(cid, field_name="checkpoint_id")
            owner = live.get(os.path.basename(final))
            if owner is not None:
                raise CheckpointExistsError(
                    f"{final}: another save ({owner.holder}) is writing this checkpoint right now; "
                    "pass another checkpoint_id or wait for it"
                )
            if os.path.lexists(final) and not overwrite:
                raise CheckpointExistsError(
                    f"{final}: a checkpoint already exists there; pass overwrite=True or another checkpoint_id"
                )
            staging = storage.create_staging(final, uuid.uuid4().hex[:12], sequence)
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        return {"path": final, "staging": staging, "checkpoint_id": cid, "sequence": sequence, "timestamp": stamp}

    def _validated(self, validate: bool) -> list[StateComponent]:
        return [
            c for c in self.components
            if c.pattern.identical_replicas
            and c.validation_level is not ValidationLevel.NONE
            and (c.validate_replication or validate)
        ]

    def _state(self, states: dict[str, Any], key: str) -> Any:
        if key not in states:
            states[key] = self._by_key[key].stateful.state_dict()
        return states[key]

    def _validate(self, plan: _SavePlan, validate: bool, states: dict[str, Any]) -> None:
        """Phase 2: compare digests of every replica set; every rank reaches the same verdict."""
        targets = self._validated(validate)
        if not targets:
            return

        mine: dict[str, dict[str, str]] = {}

        def work() -> dict[str, str]:
            self._hook("validate")
            for c in targets:
                mine[c.key] = digest_state(self._state(states, c.key), c.validation_level)
            return {key: _combined(entries) for key, entries in mine.items()}

        # Round 1: one digest per component. Round 2, only when some set
        # disagrees: the per-entry digests of the suspect components.
        combined = exchange(self._comm, "validate", work)
        suspects = [
            c.key for c in targets
            if any(len({combined[r][c.key] for r in members}) > 1
                   for members in plan.components[c.key].replica_sets)
        ]
        if not suspects:
            return
        digests = exchange(self._comm, "validate", lambda: {key: mine[key] for key in suspects})
        mismatches: list[Mismatch] = []
        for key in suspects:
            sets = plan.components[key].replica_sets
            mismatches += compare_replicas(key, sets, {r: d[key] for r, d in enumerate(digests)})
        full = {c.key for c in targets if c.validation_level is ValidationLevel.FULL}
        if any(m.component in full for m in mismatches):
            mismatches = self._measure_differences(mismatches, full, states)
        failures: dict[int, str] = {}
        for m in mismatches:
            for group in m.groups[1:]:
                for rank in group:
                    failures[rank] = (f"component {m.component!r} differs from ranks {list(m.groups[0])} in "
                                      + ", ".join(m.entries[:4]) + (" ..." if len(m.entries) > 4 else ""))
        raise ReplicationMismatchError(
            "replication validation failed; nothing was written:\n  " + "\n  ".join(m.describe() for m in mismatches),
            failures=failures, phase="validate",
        )

    def _measure_differences(self, mismatches: list[Mismatch], full: set[str], states: dict[str, Any]) -> list[Mismatch]:
        """FULL level: one more all-gather of the differing tensors, then measure how far apart they are."""
        def work() -> dict[str, dict[str, Any]]:
            mine: dict[str, dict[str, Any]] = {}
            budget = _DETAIL_LIMIT_BYTES
            for m in mismatches:
                if m.component not in full or self.rank not in {g[0] for g in m.groups}:
                    continue
                leaves = {p: leaf for p, kind, leaf in iter_leaves(states[m.component]) if kind == "tensor"}
                for entry in m.entries:
                    t = leaves.get(entry)
                    if t is not None and t.numel() * t.element_size() <= budget:
                        budget -= t.numel() * t.element_size()
                        mine.setdefault(m.component, {})[entry] = t.detach().cpu()
            return mine

        shared = exchange(self._comm, "validate", work)
        out = []
        for m in mismatches:
            details: dict[str, str] = {}
            if m.component in full:
                ref = m.groups[0][0]
                for group in m.groups[1:]:
                    for entry in m.entries:
                        a = shared[ref].get(m.component, {}).get(entry)
                        b = shared[group[0]].get(m.component, {}).get(entry)
                        if a is not None and b is not None:
                            details[f"{entry} (rank {ref} vs {group[0]})"] = describe_difference(a, b)
            out.append(Mismatch(m.component, m.replica_set, m.groups, m.entries, details))
        return out

    def _encoder(self, plan: _SavePlan, states: dict[str, Any], copy: bool) -> Callable[[], Iterator[_Job]]:
        """This rank's files to write, encoded lazily (sync) or snapshotted up front (async)."""
        def jobs() -> Iterator[_Job]:
            for c in self.components:
                for f in plan.components[c.key].files:
                    if f.writer == self.rank:
                        reuse = self._snapshots.setdefault(c.key, {}) if copy else None
                        encoded = encode(self._state(states, c.key), copy=copy, reuse=reuse)
                        if f.parts == 1:  # a whole file: nothing to fit together
                            yield c.key, f.path, encoded, "", ()
                            continue
                        structure = storage.checksum_of(encoded.header, "xxh3-64")
                        pieces = encoded.split(f.parts)
                        siblings = tuple((p.path, pieces[p.part]) for p in plan.components[c.key].files
                                         if f.part == 0 and p.ranks == f.ranks and p.part != 0)
                        yield c.key, f.path, pieces[f.part], structure, siblings

        if not copy:
            return jobs
        try:
            snapshot = list(jobs())
        except Exception as exc:  # reported through the write phase, so every rank hears it
            error = exc

            def failed() -> Iterator[_Job]:
                raise error
            return failed
        return lambda: iter(snapshot)

    def _start_async(self, plan: _SavePlan, states: dict[str, Any], validate: bool, overwrite: bool,
                     started: float) -> SaveHandle:
        if self._async_comm is None or getattr(self._async_comm, "broken", False):
            # A channel whose last collective failed is replaced (collective: that failure
            # reached every rank); the background thread never builds groups itself.
            fork = getattr(self._comm, "fork", None)
            if fork is None:
                raise TypeError(f"async_save needs a Comm with fork(); {type(self._comm).__name__} has none")
            self._async_comm = fork()
        produce = self._encoder(plan, states, copy=True)
        handle = SaveHandle(plan.path)
        comm = self._async_comm
        log.debug("distckpt: %s snapshotted in %.3f s; writing in the background", plan.path,
                  time.perf_counter() - started)

        def run() -> None:
            try:
                self._write_and_commit(comm, plan, produce, validate, overwrite, started)
            except BaseException as exc:
                if self.rank == 0:
                    _remove_tree(plan.staging)
                handle._finish(exc)
            else:
                handle._finish(None)

        self._pending = handle
        threading.Thread(target=run, name=f"distckpt-save-{plan.checkpoint_id}", daemon=False).start()
        return handle

    def _write_and_commit(self, comm: Comm, plan: _SavePlan, produce: Callable[[], Iterator[_Job]],
                          validate: bool, overwrite: bool, started: float) -> None:
        records = self._write(comm, plan, produce)
        manifest = self._commit(comm, plan, records, validate, overwrite)
        total = sum(c.size_bytes for c in manifest.components.values())
        log.info("distckpt: saved %s (%d components, %d files, %d bytes) in %.3f s", plan.path,
                 len(manifest.components), sum(len(c.files) for c in manifest.components.values()),
                 total, time.perf_counter() - started)

    def _write(self, comm: Comm, plan: _SavePlan,
               produce: Callable[[], Iterator[_Job]]) -> dict[str, dict[str, _Record]]:
        """Phase 3: each writer writes its sets' files into staging; all-gather the records.

        Every rank then checks that the parts of each balanced write come from
        one state: the same structure, and each part's checksum equal to the
        one the part-0 writer predicts from its own replica (else the parts
        would assemble into a state no rank holds).
        """
        def work() -> list[tuple[str, str, int, str, str, dict[str, str]]]:
            self._hook("write")
            written = []
            for key, path, encoded, structure, siblings in produce():
                storage.make_component_dir(plan.staging, key)
                size, checksum = storage.write_runs(os.path.join(plan.staging, path), encoded.runs())
                predicted = {p: storage.checksum_of_chunks(piece.chunks()) for p, piece in siblings}
                written.append((key, path, size, checksum, structure, predicted))
            return written

        gathered = exchange(comm, "write", work)
        records: dict[str, dict[str, _Record]] = {}
        predictions: dict[str, dict[str, str]] = {}
        for rank, items in enumerate(gathered):
            for key, path, size, checksum, structure, predicted in items:
                records.setdefault(key, {})[path] = (size, checksum, rank, structure)
                predictions.setdefault(key, {}).update(predicted)
        _check_parts_agree(plan, records, predictions)
        return records

    def _commit(
        self, comm: Comm, plan: _SavePlan, records: Mapping[str, Mapping[str, _Record]],
        validate: bool, overwrite: bool,
    ) -> CheckpointManifest:
        """Phase 4: every rank votes; then rank 0 writes the manifest last and renames staging into place."""
        validated = {c.key: c.validation_level.value for c in self._validated(validate)}
        manifest = _build_manifest(plan, self.components, records, validated)

        def prepare() -> None:
            self._hook("commit")
            if self.rank == 0:
                storage.require_real_dir(plan.staging, "staging directory")
                for key in plan.components:
                    storage.fsync_dir(os.path.join(plan.staging, key))
                manifest.save(os.path.join(plan.staging, MANIFEST_NAME))
                storage.fsync_dir(plan.staging)

        def publish() -> None:  # rank 0 only
            storage.commit_directory(plan.staging, plan.path, overwrite, self.timeout / 2)
            self._retain(plan.path)

        exchange(comm, "commit", prepare)
        announce(comm, "commit", publish)
        return manifest

    def _retain(self, committed: str) -> None:
        """Rank 0, after commit: keep the newest ``keep_last``; a failed delete only warns."""
        parent = os.path.abspath(self.checkpoints_dir)
        if self.keep_last is None or os.path.dirname(os.path.abspath(committed)) != parent:
            return
        entries = [e for e in storage.list_checkpoints(parent) if e.committed]
        for entry in entries[: max(0, len(entries) - self.keep_last)]:
            try:
                storage.remove_checkpoint(entry.path)
            except OSError as exc:
                log.warning("distckpt: retention could not remove %s: %s", entry.path, exc)

    # ------------------------------------------------------------ load phases

    def _resolve(
        self, checkpoint_path: Any, strict: bool, args: Mapping[str, Any]
    ) -> tuple[str, CheckpointManifest | None, Topology, list[str]]:
        """Phase 1 of load: all agree on the world; rank 0 finds the checkpoint and broadcasts its manifest."""
        def work() -> dict[str, Any]:
            self._hook("resolve")
            return self._local_report()

        topology = self._agree(exchange(self._comm, "resolve", work, agree=args))

        def find() -> tuple[str, dict[str, Any] | None, list[str]]:  # rank 0 only
            path = self._find(checkpoint_path)
            manifest_file = os.path.join(path, MANIFEST_NAME)
            if not os.path.lexists(manifest_file) and is_legacy_checkpoint(path):
                return path, None, []
            manifest = CheckpointManifest.load(manifest_file)
            listed = [f.path for c in manifest.components.values() for f in c.files]
            unlisted = storage.unlisted_files(path, listed)
            if unlisted and strict:
                raise IntegrityError(
                    f"{path}: files not listed in the manifest: {unlisted} (something else wrote into "
                    "this checkpoint; remove them, or load with strict=False to ignore them)"
                )
            return path, manifest.to_dict(), unlisted

        path, raw, unlisted = announce(self._comm, "resolve", find)
        manifest = None if raw is None else CheckpointManifest.from_dict(raw, where=os.path.join(path, MANIFEST_NAME))
        return path, manifest, topology, unlisted

    def _find(self, checkpoint_path: Any) -> str:
        if checkpoint_path is None:
            latest = self.latest_checkpoint()
            if latest is None:
                raise CheckpointNotFoundError(
                    f"{self.checkpoints_dir}: no committed checkpoint to load (incomplete or corrupt "
                    "directories are ignored)"
                )
            return latest
        path: str = os.path.abspath(os.fspath(checkpoint_path))
        if os.path.islink(path):
            raise CheckpointNotFoundError(f"{path}: checkpoint directory is a symlink; refusing to follow it")
        if not os.path.isdir(path):
            raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
        return path

    def _compatible_everywhere(
        self, path: str, manifest: CheckpointManifest, topology: Topology, strict: bool
    ) -> tuple[dict[str, ComponentManifest], dict[str, str]]:
        """Collective: :meth:`_check_compatible` on every rank, then one verdict for all.

        One rank's compatibility failure fails every rank at once, before any
        data is read (not a peer waiting out the timeout in the read phase).
        """
        checked: list[tuple[dict[str, ComponentManifest], dict[str, str]]] = []
        exchange(self._comm, "resolve", lambda: checked.append(self._check_compatible(path, manifest, topology, strict)))
        return checked[0]

    def _check_compatible(
        self, path: str, manifest: CheckpointManifest, topology: Topology, strict: bool
    ) -> tuple[dict[str, ComponentManifest], dict[str, str]]:
        """Every rank, before reading data: what to load, what to skip, or why not."""
        actions: dict[str, ComponentManifest] = {}
        skipped: dict[str, str] = {}
        problems: list[str] = []
        topo_problems: list[str] = []
        for c in self.components:
            saved = manifest.components.get(c.key)
            if saved is None:
                if c.required:
                    problems.append(f"required component {c.key!r} is not in the checkpoint")
                else:
                    skipped[c.key] = "optional component not in checkpoint"
                continue
            if _saved_pattern(path, c.key, saved) != c.pattern:
                problems.append(
                    f"component {c.key!r} was saved as {saved.describe_pattern()} "
                    f"but is declared {c.pattern.describe()}"
                )
                continue
            current = c.pattern.partition(topology)
            if not c.pattern.elastic:
                if tuple(saved.replicated_across) != current:
                    topo_problems.append(
                        f"component {c.key!r} ({c.pattern.describe()}) was saved with replica sets "
                        f"{_sets_text(saved.replicated_across)} (world {manifest.world_size}) but the "
                        f"current world gives {_sets_text(current)} (world {topology.world_size})"
                    )
                    continue
            elif not saved.files:
                problems.append(f"component {c.key!r} lists no file")
                continue
            actions[c.key] = saved
        undeclared = sorted(set(manifest.components) - set(self._by_key))
        if undeclared:
            if strict:
                problems.append(f"checkpoint holds components nobody declared: {undeclared} (load with strict=False to ignore)")
            else:
                skipped.update({k: "in checkpoint but not declared" for k in undeclared})
        if topo_problems:
            raise TopologyMismatchError(f"{path}: cannot load into this world:\n  " + "\n  ".join(topo_problems + problems),
                                        phase="resolve")
        if problems:
            raise ComponentMismatchError(f"{path}: checkpoint does not match the declarations:\n  " + "\n  ".join(problems),
                                         phase="resolve")
        return actions, skipped

    def _read(
        self, path: str, manifest: CheckpointManifest, actions: Mapping[str, ComponentManifest],
        skipped: Mapping[str, str],
    ) -> LoadReport:
        """Phase 2 of load: read, verify and restore this rank's file of every component."""
        files: dict[str, str] = {}
        touched: list[str] = []

        def work() -> None:
            self._hook("read")
            for key, saved in actions.items():
                entries = saved.files_for_rank(self.rank, self._by_key[key].pattern.elastic)
                stateful = self._by_key[key].stateful
                live = stateful.state_dict() if self.load_in_place else None
                if live is not None:
                    touched.append(key)  # read_component writes into these tensors
                state = read_component(path, entries, live)
                if live is None:
                    touched.append(key)
                stateful.load_state_dict(state)
                files[key] = entries[0].path

        if self.load_strategy == "read_and_broadcast" and self.world_size > 1:
            self._read_and_broadcast(path, actions, files, touched)
        else:
            exchange(self._comm, "read", work, note=lambda: _modified(touched))
        return LoadReport(path=path, checkpoint_id=manifest.checkpoint_id, loaded=tuple(actions),
                          skipped=dict(skipped), files=files)

    def _read_and_broadcast(self, path: str, actions: Mapping[str, ComponentManifest], files: dict[str, str],
                            touched: list[str]) -> None:
        """Phase 2 of load, ``read_and_broadcast``: the lowest rank of each set reads and verifies
        its files, every rank hears whether all reads succeeded, the bytes go out within each set
        (a gloo group per set), and every rank decodes and restores."""
        send = getattr(self._comm, "broadcast_in_sets", None)
        if send is None:
            raise TypeError(f"load_strategy='read_and_broadcast' needs a Comm with broadcast_in_sets(); "
                            f"{type(self._comm).__name__} has none")
        sets = {key: _load_sets(saved, self.world_size, self._by_key[key].pattern.elastic)
                for key, saved in actions.items()}
        buffers: dict[str, list[torch.Tensor]] = {}

        def fetch() -> None:
            self._hook("read")
            for key, saved in actions.items():
                entries = saved.files_for_rank(self.rank, self._by_key[key].pattern.elastic)
                reader = min(next(m for m in sets[key] if self.rank in m))
                if reader == self.rank:
                    buffers[key] = [torch.frombuffer(b, dtype=torch.uint8) for b in read_files(path, entries)]
                else:
                    buffers[key] = [torch.empty(e.size_bytes, dtype=torch.uint8) for e in entries]

        def restore() -> None:
            for key, saved in actions.items():
                entries = saved.files_for_rank(self.rank, self._by_key[key].pattern.elastic)
                state = decode_files(path, entries, [tensor_bytes(t) for t in buffers[key]])
                touched.append(key)
                self._by_key[key].stateful.load_state_dict(state)
                files[key] = entries[0].path

        exchange(self._comm, "read", fetch)
        for key in actions:
            send(sets[key], buffers[key], "read")
        exchange(self._comm, "read", restore, note=lambda: _modified(touched))

    def _read_legacy(self, path: str, topology: Topology, strict: bool) -> LoadReport:
        outcome: dict[str, Any] = {}

        def work() -> None:
            self._hook("read")
            outcome["report"] = load_legacy(path, self.components, topology, self.rank, strict)

        exchange(self._comm, "read", work)
        report: LoadReport = outcome["report"]
        return report


def _call_args(**args: Any) -> dict[str, Any]:
    """Per-call arguments as every rank compares them: paths absolute, ids as text, flags as bools."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        try:
            if value is None:
                out[name] = None
            elif name == "checkpoint_path":
                out[name] = os.path.abspath(os.fspath(value))
            elif name == "checkpoint_id":
                out[name] = str(value)
            else:
                out[name] = bool(value)
        except Exception:  # unusable: the call itself reports it; compare by type only
            out[name] = f"<{type(value).__name__}>"
    return out


def _modified(touched: Sequence[str]) -> str:
    """This rank's line in a failed load's error: which components' live state changed."""
    if not touched:
        return "changed no live state"
    return f"changed the live state of {list(touched)} (loaded, or read into in place)"


def _combined(entries: Mapping[str, str]) -> str:
    """One digest for a whole component: of its entries' digests in path order."""
    return storage.checksum_of(json.dumps(sorted(entries.items())).encode("ascii"), "xxh3-64")


def _load_sets(saved: ComponentManifest, world_size: int, elastic: bool) -> tuple[tuple[int, ...], ...]:
    """Replica sets in the loading world: the saved ones, or for an elastic pattern (GLOBAL,
    REPLICATED) the ranks grouped by the saved set each of them reads."""
    if not elastic:
        return tuple(saved.replicated_across)
    readers: dict[tuple[int, ...], list[int]] = {}
    for rank in range(world_size):
        readers.setdefault(saved.files_for_rank(rank, True)[0].ranks, []).append(rank)
    return tuple(tuple(v) for v in readers.values())


def _saved_pattern(path: str, key: str, saved: ComponentManifest) -> Pattern:
    """The pattern object a manifest entry records; :class:`ManifestError` when its kind is not
    registered in this process or its params do not rebuild it."""
    try:
        return pattern_from_record(saved.kind, saved.params or {})
    except (LookupError, ValueError) as exc:
        raise ManifestError(f"{path}: component {key!r}: {exc}", phase="resolve") from None


def _plan_digest(plans: Mapping[str, ComponentPlan]) -> str:
    text = repr(sorted((key, [(f.path, f.ranks, f.writer) for f in p.files]) for key, p in plans.items()))
    return storage.checksum_of(text.encode(), "xxh3-64")


def _check_same_plan(digests: Sequence[str], components: Sequence[StateComponent]) -> None:
    """Every rank: the patterns gave every rank the same files, or every rank raises."""
    differ = {rank: "planned different files than rank 0" for rank, d in enumerate(digests) if d != digests[0]}
    if differ:
        kinds = ", ".join(sorted({c.pattern.describe() for c in components}))
        raise TopologyMismatchError(
            f"sharing patterns gave different replica sets on different ranks (patterns: {kinds}); "
            "replica_sets(topology) must be deterministic", failures=differ, phase="plan")


def _check_parts_agree(plan: _SavePlan, records: Mapping[str, Mapping[str, _Record]],
                       predictions: Mapping[str, Mapping[str, str]]) -> None:
    """Every rank, after the write phase: the parts of each balanced write come from one state.

    A part must encode the same structure as part 0 of its set, and its
    checksum must equal the one part 0's writer predicted from its own
    replica (``predictions``: key -> part path -> checksum). Either failing
    raises the same :class:`ReplicationMismatchError` on every rank (phase
    "write"), naming the writers of the parts that disagree; nothing commits.
    """
    structure: dict[int, str] = {}
    values: dict[int, str] = {}
    for key, cplan in plan.components.items():
        for f in cplan.files:
            if f.part == 0:
                continue
            first = next(p for p in cplan.files if p.ranks == f.ranks and p.part == 0)
            if records[key][f.path][3] != records[key][first.path][3]:
                structure[f.writer] = (f"component {key!r}: part {f.part} encodes a different structure "
                                       f"than rank {first.writer}'s part 0")
            elif predictions.get(key, {}).get(f.path) != records[key][f.path][1]:
                values[f.writer] = (f"component {key!r}: part {f.part} (written by rank {f.writer}) holds other "
                                    f"bytes than the same part of rank {first.writer}'s replica")
    if structure:
        raise ReplicationMismatchError(
            "balanced write: replicas hold differently structured state (keys, dtypes, shapes or "
            "non-tensor values), so their parts do not fit together; nothing was committed. "
            "Save with validate=True to see where they differ",
            failures=structure, phase="write",
        )
    if values:
        raise ReplicationMismatchError(
            "balanced write: members writing parts of one replica set held different tensor values when "
            "they wrote (a replica changed after validation, or was never validated), so the parts would "
            "assemble into a state no rank holds; nothing was committed. Save with validate=True to see "
            "where they differ, and do not change the state during a save",
            failures=values, phase="write",
        )


def _sets_text(sets: Sequence[Sequence[int]]) -> str:
    text = str([list(s) for s in sets])
    return text if len(text) <= 120 else text[:117] + "..."


def _diff_declarations(ref: Sequence[Any], mine: Sequence[Any]) -> str:
    ref_by_key = {d[0]: d for d in ref}
    my_by_key = {d[0]: d for d in mine}
    parts = []
    for key in sorted(set(ref_by_key) | set(my_by_key)):
        a, b = ref_by_key.get(key), my_by_key.get(key)
        if a == b:
            continue
        if a is None:
            parts.append(f"declares {key!r} which rank 0 does not")
        elif b is None:
            parts.append(f"does not declare {key!r}")
        else:
            parts.append(f"declares {key!r} as {b[1:]} where rank 0 has {a[1:]}")
    return "; ".join(parts)


def _build_manifest(
    plan: _SavePlan,
    components: Sequence[StateComponent],
    records: Mapping[str, Mapping[str, _Record]],
    validated: Mapping[str, str],
) -> CheckpointManifest:
    entries: dict[str, ComponentManifest] = {}
    for c in components:
        cplan = plan.components[c.key]
        files = []
        for f in cplan.files:
            size, checksum, writer, _ = records[c.key][f.path]
            files.append(FileEntry(path=f.path, ranks=f.ranks, writer=writer, size_bytes=size, checksum=checksum,
                                   part=f.part, parts=f.parts))
        entries[c.key] = ComponentManifest(
            key=c.key,
            sharing_pattern=c.pattern.kind,
            group_name=c.process_group_name,
            params=c.pattern.params(),
            ranks=cplan.writers,
            replicated_across=cplan.replica_sets,
            files=tuple(files),
            required=c.required,
            validation=validated.get(c.key),
            size_bytes=sum(f.size_bytes for f in files),
            checksum=storage.checksum_of("\n".join(f.checksum for f in files).encode()),
            metadata=dict(c.metadata or {}),
        )
    return CheckpointManifest(
        checkpoint_id=plan.checkpoint_id,
        world_size=plan.topology.world_size,
        timestamp=plan.timestamp,
        components=entries,
        topology=plan.topology.to_dict(),
        sequence=plan.sequence,
        library_version=__version__,
        pytorch_version=torch.__version__,
    )


def _normalise_groups(process_groups: Any) -> dict[str, Any]:
    if process_groups is None:
        return {}
    if isinstance(process_groups, Mapping):
        groups = dict(process_groups)
    elif hasattr(process_groups, "mesh_dim_names"):
        names = process_groups.mesh_dim_names
        if not names:
            raise ValueError("process_groups: a DeviceMesh needs mesh_dim_names to name its groups")
        groups = {name: process_groups.get_group(name) for name in names}
    else:
        raise TypeError(
            f"process_groups: expected a dict of name -> ProcessGroup or a DeviceMesh, got {type(process_groups).__name__}"
        )
    folded: dict[str, str] = {}
    for name in groups:
        check_name(name, field_name="process_groups")
        if name.casefold() in folded:
            raise ValueError(
                f"process_groups: names {folded[name.casefold()]!r} and {name!r} collide "
                "(group names must be unique ignoring case)"
            )
        folded[name.casefold()] = name
    return groups


def _remove_tree(path: str) -> None:
    """Rank 0, after a failed save: remove its staging directory and drop its owner lock."""
    storage.discard_staging(path)
