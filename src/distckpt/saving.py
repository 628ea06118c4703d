"""The save phases: plan, write and commit, as functions of a channel, a plan and storage.

Called by the coordinator's facade (:meth:`CheckpointCoordinator.save_checkpoint`)
on every rank, and by :mod:`distckpt.asyncsave`'s background thread for the
write and commit of an asynchronous save. Every phase ends in an
error-carrying collective (:func:`~distckpt.collectives.exchange` or
:func:`~distckpt.collectives.announce`), so a failure on any rank is raised on
every rank at the same step. Validation, phase 2, is :mod:`distckpt.validation`.

1. :func:`plan`: rank 0 fixes path, id and sequence and creates the staging
   directory (:func:`distckpt.series.allocate`); every rank reports its node,
   groups and declarations; every rank checks agreement and derives the same
   file plan (:mod:`distckpt.planning`), the parts of balanced writes sized by
   each replica set's lowest rank alone.
2. :func:`write`: the lowest rank of every replica set writes that set's file
   into staging, hashing while writing (a balanced write: several members of a
   large set write one part each); every rank checks the parts fit together.
3. :func:`commit`: every rank votes; only then does rank 0 write the manifest
   last, rename staging to the final name and apply retention.

A failed phase leaves staging in place; the facade (or the background thread)
removes it on rank 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import torch

from . import folder, storage, wire
from .codec import encode, state_nbytes
from .collectives import Comm, announce, exchange
from .components import StateComponent
from .hashing import BackgroundChecksums, checksum_of
from .layout import ComponentPlan
from .logs import note
from .manifest import MANIFEST_NAME, CheckpointManifest
from .planning import (
    Job,
    Produce,
    Record,
    SavePlan,
    agree,
    build_manifest,
    check_parts_agree,
    check_same_plan,
    leader_part_counts,
    plan_components,
    plan_digest,
    split_components,
)
from .planreports import AgreedWorld, compact, plan_vote, read_vote, reports_key
from .progress import Progress
from .series import Allocation
from .snapshots import PredictedPart, SnapshotBudget, streamed
from .topology import Topology

__all__ = ["States", "commit", "encoder", "plan", "write", "write_and_commit"]


class States:
    """This rank's state of each component in one save, asked of its ``Stateful`` at most once.

    ``state_dict()`` is called only where needed: on the ranks that write a
    file of the component or validate it, or report its size.
    """

    def __init__(self, components: Mapping[str, StateComponent]) -> None:
        self._components = components
        self._states: dict[str, Any] = {}

    def __call__(self, key: str) -> Any:
        if key not in self._states:
            self._states[key] = self._components[key].stateful.state_dict()
        return self._states[key]


def plan(comm: Comm, components: Sequence[StateComponent], report: Callable[..., Any],
         states: States, *, allocate: Callable[[bool], Allocation | None], min_part_bytes: int | None,
         hook: Callable[[str], None], args: Mapping[str, Any],
         size_of: Callable[[str], int] | None = None, agreed: AgreedWorld | None = None) -> SavePlan:
    """Phase 1, collective: agree on the call, the world and the files; rank 0 allocates the target.

    ``report`` gives this rank's node, groups and declarations
    (:func:`distckpt.planning.local_report`); ``allocate(create)`` runs on rank 0 only
    (:func:`distckpt.series.allocate`; with ``create=False`` it returns ``None`` rather than
    create a missing folder). ``args`` are this rank's call
    arguments, compared across ranks. ``size_of(key)``: this rank's state of ``key`` in bytes,
    asked only where it decides a balanced write (default: ``codec.state_nbytes`` of the state;
    an asynchronous save walks it once for this and its snapshot, :class:`distckpt.asyncsave.Walks`).
    ``agreed``: the coordinator's last plan phase (:class:`~distckpt.planreports.AgreedWorld`); in a
    world of up to :data:`_ONE_ROUND_WORLD` ranks where no rank's report or group names changed
    since and the target's folder exists, the files are planned in the first round
    (:func:`_guess`) and the phase takes one collective instead of two. The returned plan's
    ``agreed`` is this phase's, for the next save.
    On failure anywhere, every rank raises, and rank 0 removes the staging directory it had created.
    """
    mine: dict[str, Any] = {}
    names: list[str] = []  # this rank's group names, to decode the compact reports
    split = min_part_bytes if comm.world_size > 1 else None
    one_round = comm.world_size <= _ONE_ROUND_WORLD

    def decide(create: bool = True) -> dict[str, Any] | None:  # rank 0, once its own plan is made
        if "decision" not in mine:
            decision = allocate(create)
            if decision is None:
                return None
            mine["decision"] = decision
        decided: dict[str, Any] = mine["decision"]
        return decided

    def sizes(key: str) -> int:
        return size_of(key) if size_of is not None else state_nbytes(states(key))

    def work() -> bytes | tuple[Any, ...]:
        hook("plan")
        names[:] = sorted(report(True)["groups"])
        out: bytes = report()
        if not one_round:
            return out  # sizes travel in the second round, from the ranks whose size decides
        return _guess(comm, components, agreed, out, names, sizes, split, mine, decide)

    try:  # the coordinators' min_part_bytes must agree too: it decides how every rank splits the sets
        gathered = exchange(comm, "plan", work, agree={**args, "min_part_bytes": split})
        rounds = [_FirstRound(*g) for g in gathered] if one_round else None
        reports: list[Any] = [r.report for r in rounds] if rounds is not None else list(gathered)
        if rounds is not None and _guessed(rounds):  # the files were planned in this round, on the same world
            assert agreed is not None
            topology = agreed.topology
            votes = [read_vote(r.vote) for r in rounds if r.vote is not None]
            plans = _split(topology, components, mine["plans"], votes, split)
            decided = rounds[0].decision
        else:
            topology = agree(reports, lambda: exchange(comm, "plan", lambda: report(True)), names=names)
            if one_round:  # the decision rides in the digests' round
                plans, decided = _plan_files(comm, components, topology, sizes, split, decide)
            else:  # a broadcast: in the sized rounds every payload would be padded to the decision's size
                decided = announce(comm, "plan", decide)
                plans, _ = _plan_files(comm, components, topology, sizes, split, None)
        assert decided is not None  # rank 0 either decided or raised, and then every rank raised
    except BaseException:
        if "decision" in mine:
            folder.discard_staging(mine["decision"]["staging"])
        raise
    world = AgreedWorld(tuple(reports), tuple(names), topology) if rounds is not None and compact(reports) else None
    return SavePlan(topology=topology, components=plans, agreed=world, **decided)


class _FirstRound(NamedTuple):
    """What a rank sends in the plan phase's first round of a small world (as a plain tuple)."""

    report: bytes  # planning.local_report
    key: int | None  # the key of the reports it kept (AgreedWorld.key), if it guessed
    vote: bytes | None  # planreports.plan_vote on the kept topology, if it guessed
    decision: dict[str, Any] | None  # rank 0's allocation, if it guessed and its folder exists


def _guess(comm: Comm, components: Sequence[StateComponent], agreed: AgreedWorld | None, report: bytes,
           names: Sequence[str], sizes: Callable[[str], int], split: int | None, mine: dict[str, Any],
           decide: Callable[[bool], dict[str, Any] | None]) -> tuple[Any, ...]:
    """This rank's :class:`_FirstRound`, as a tuple: with its guess when its report is the one it
    sent last time (the key of the world it kept, its vote on that topology, and on rank 0 the
    target, allocated only if its folder exists, so that a call whose arguments turn out to
    differ creates no folder). The guess's plans are left in ``mine["plans"]``.

    Whatever the guess raises (a pattern, ``state_dict()`` where it sizes a set, the allocation)
    fails the first round on every rank, once, rather than being retried. When the world is
    unchanged (the case a guess is for) it is what the second round would raise. When another
    rank's report changed, this rank guessed on the world it kept and may raise what the new
    world would not (sizing a set it no longer leads). A coordinator's world rarely changes (a
    pattern whose description does), and the save then fails on every rank; it never hangs or
    mis-plans."""
    if agreed is None or (topology := agreed.guess(comm.rank, report, names)) is None:
        return report, None, None, None
    plans = plan_components(topology, components)
    counts = leader_part_counts(comm.rank, comm.world_size, components, plans, sizes, split) if split else b""
    mine["plans"] = plans
    return report, agreed.key, plan_vote(plan_digest(plans), counts), decide(False) if comm.rank == 0 else None


def _guessed(rounds: Sequence[_FirstRound]) -> bool:
    """Whether every rank guessed, on the world that was gathered, and rank 0 allocated (the same
    answer on every rank: only gathered bytes decide it)."""
    reports = [r.report for r in rounds]
    return (compact(reports) and rounds[0].decision is not None and all(r.vote is not None for r in rounds)
            and {r.key for r in rounds} == {reports_key(reports)})


#: Worlds up to this size gather in one round of fixed slots (:mod:`distckpt.wire`), where rank
#: 0's decision costs the others nothing; larger worlds pad every payload to the longest one.
_ONE_ROUND_WORLD = wire.SLOTTED_WORLD_BYTES // wire.SLOT_BYTES


def _plan_files(comm: Comm, components: Sequence[StateComponent], topology: Topology,
                size_of: Callable[[str], int], min_part_bytes: int | None,
                decide: Callable[[], dict[str, Any] | None] | None) -> tuple[dict[str, ComponentPlan], dict[str, Any] | None]:
    """Every rank: each component's files from its pattern, inside a collective so that a
    pattern that raises, or answers differently on some rank, fails every rank. With
    ``min_part_bytes``, the lowest rank of each replica set sizes its state (``size_of``) in the
    same collective, and the sets large enough are split into parts from what they sent; the
    other ranks never walk their state here. With ``decide``, rank 0 also allocates the target
    once its own plan is made, and its decision travels in the same round (returned to every
    rank; ``None`` without ``decide``)."""
    plans: dict[str, ComponentPlan] = {}

    def vote() -> bytes:
        plans.update(plan_components(topology, components))
        counts = (leader_part_counts(comm.rank, comm.world_size, components, plans, size_of, min_part_bytes)
                  if min_part_bytes else b"")
        return plan_vote(plan_digest(plans), counts)

    decided: dict[str, Any] | None = None
    if decide is None:  # the vote alone: in the sized rounds every payload is padded to the longest
        votes = list(map(read_vote, exchange(comm, "plan", vote)))
    else:
        gathered = exchange(comm, "plan", lambda: (vote(), decide() if comm.rank == 0 else None))
        votes, decided = [read_vote(v) for v, _ in gathered], gathered[0][1]
    return _split(topology, components, plans, votes, min_part_bytes), decided


def _split(topology: Topology, components: Sequence[StateComponent], plans: dict[str, ComponentPlan],
           votes: Sequence[tuple[int, bytes]], min_part_bytes: int | None) -> dict[str, ComponentPlan]:
    """Every rank: the same plans everywhere (or every rank raises), with the large replica sets
    split into the parts their lowest ranks asked for."""
    check_same_plan([digest for digest, _ in votes], components)
    if min_part_bytes and any(counts for _, counts in votes):
        return split_components(topology, components, plans, [counts for _, counts in votes], min_part_bytes)
    return plans


def encoder(rank: int, components: Sequence[StateComponent], plan: SavePlan, states: States,
            snapshots: dict[str, dict[int, torch.Tensor]] | None = None,
            budget: int | None = None) -> Produce:
    """This rank's files to write: encoded lazily (``snapshots`` is None, a synchronous save) or
    copied to host memory now, reusing the buffers in ``snapshots`` (an asynchronous save).

    Local. An error while snapshotting is not raised here: the returned
    producer raises it inside the write phase, so every rank hears it. With a
    ``budget`` (bytes) that this rank's files exceed, the copies stream
    instead (:mod:`distckpt.snapshots`): the returned producer has a ``pump``
    attribute, which the caller runs once the writing thread is started.
    """
    copy = snapshots is not None

    def jobs(reserve: Callable[[int], None] | None = None) -> Iterator[Job]:
        for c in components:
            for f in plan.components[c.key].files:
                if f.writer == rank:
                    if reserve is not None:
                        reserve(state_nbytes(states(c.key)))
                    reuse = snapshots.setdefault(c.key, {}) if snapshots is not None and reserve is None else None
                    encoded = encode(states(c.key), copy=copy, reuse=reuse)
                    if f.parts == 1:  # a whole file: nothing to fit together
                        yield c.key, f.path, encoded, "", ()
                        continue
                    structure = checksum_of(encoded.header, "xxh3-64")
                    pieces = encoded.split(f.parts)
                    siblings = tuple((p.path, pieces[p.part]) for p in plan.components[c.key].files
                                     if f.part == 0 and p.ranks == f.ranks and p.part != 0)
                    yield c.key, f.path, pieces[f.part], structure, siblings

    if not copy:
        writes = [c for c in components if any(f.writer == rank for f in plan.components[c.key].files)]
        if len(writes) < 2 or type(states) is not States:  # another provider (async copies) may block: in order
            return jobs

        def ahead() -> Iterator[Job]:  # called inside the write phase: an error here reaches every rank
            for c in writes:
                states(c.key)  # every state_dict() call in the caller's thread; only encoding in the helper's
            return _ahead(jobs())
        return ahead
    if budget is not None and snapshots is not None:
        mine = sum(state_nbytes(states(c.key)) for c in components
                   if any(f.writer == rank for f in plan.components[c.key].files))
        if mine > budget:
            snapshots.clear()  # buffers kept from an earlier save would count against the budget
            limit = SnapshotBudget(budget)
            produce, pump = streamed(jobs, limit)
            produce.pump = pump  # type: ignore[attr-defined]
            produce.abort = limit.abort  # type: ignore[attr-defined]  # (the write phase may never ask)
            return produce
    try:
        snapshot = list(jobs())
    except Exception as exc:  # reported through the write phase, so every rank hears it
        error = exc

        def failed() -> Iterator[Job]:
            raise error
        return failed
    return lambda: iter(snapshot)


def _ahead(jobs: Iterator[Job]) -> Iterator[Job]:
    """``jobs``, each next one encoded in a helper thread while the caller writes the one before.

    Encoding is Python work (the GIL); writing is mostly copies, hashing and system calls
    that release it, so the two overlap. The helper only runs :func:`encode` on states the
    caller has already asked for; an error there is raised here, in the caller's thread, when
    its job is due. Stopped early (a failed write), it waits for the job in progress and drops it.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="distckpt-encode") as pool:
        pending = pool.submit(next, jobs, None)
        while (job := pending.result()) is not None:
            pending = pool.submit(next, jobs, None)
            yield job


def _counted(runs: Iterator[Any], meter: Progress) -> Iterator[Any]:
    """``runs`` (:meth:`~distckpt.codec.EncodedState.runs`) unchanged, adding each one's bytes to ``meter``."""
    for item, flag in runs:
        yield item, flag
        meter.add(flag if isinstance(item, list) else len(item))


def write(comm: Comm, plan: SavePlan, produce: Produce, hook: Callable[[str], None],
          meter: Progress | None = None, direct: bool = False) -> dict[str, dict[str, Record]]:
    """Phase 3, collective: each writer writes its sets' files into staging; all-gather the records.

    Every rank then checks that the parts of each balanced write come from
    one state: the same structure, and each part's checksum equal to the
    one the part-0 writer predicts from its own replica (else the parts
    would assemble into a state no rank holds). ``meter`` counts the bytes written;
    ``direct``: files are written around the page cache (:func:`distckpt.storage.write_runs`).
    """
    def work() -> list[tuple[str, str, int, str, str, dict[str, str]]]:
        hook("write")
        written = []
        for key, path, encoded, structure, siblings in produce():
            storage.make_component_dir(plan.staging, key)
            runs = encoded.runs() if meter is None else _counted(encoded.runs(), meter)
            predicting = BackgroundChecksums([(p, piece.chunks) for p, piece in siblings  # while writing
                                              if not isinstance(piece, PredictedPart)])
            try:
                size, checksum = storage.write_runs(os.path.join(plan.staging, path), runs, direct=direct)
            except BaseException:
                predicting.cancel()
                raise
            hashed = predicting.result()
            predicted = {p: piece.checksum if isinstance(piece, PredictedPart) else hashed[p] for p, piece in siblings}
            written.append((key, path, size, checksum, structure, predicted))
        return written

    try:
        gathered = exchange(comm, "write", work)
    finally:
        if meter is not None:
            meter.close()
    records: dict[str, dict[str, Record]] = {}
    predictions: dict[str, dict[str, str]] = {}
    for rank, items in enumerate(gathered):
        for key, path, size, checksum, structure, predicted in items:
            records.setdefault(key, {})[path] = (size, checksum, rank, structure)
            predictions.setdefault(key, {}).update(predicted)
    check_parts_agree(plan, records, predictions)
    return records


def commit(comm: Comm, plan: SavePlan, manifest: CheckpointManifest, *, overwrite: bool, wait_s: float,
           hook: Callable[[str], None], retain: Callable[[str], None]) -> None:
    """Phase 4, collective: every rank votes; then rank 0 writes ``manifest`` last, renames staging
    into place (waiting at most ``wait_s`` for the folder lock) and calls ``retain(path)``."""
    def prepare() -> None:
        hook("commit")
        if comm.rank == 0:
            storage.require_real_dir(plan.staging, "staging directory")
            for key in plan.components:
                storage.fsync_dir(os.path.join(plan.staging, key))
            manifest.save(os.path.join(plan.staging, MANIFEST_NAME))
            storage.fsync_dir(plan.staging)

    def publish() -> None:  # rank 0 only
        folder.commit_directory(plan.staging, plan.path, overwrite, wait_s)
        retain(plan.path)

    exchange(comm, "commit", prepare)
    announce(comm, "commit", publish)


def write_and_commit(comm: Comm, plan: SavePlan, produce: Produce, components: Sequence[StateComponent],
                     validated: Mapping[str, str], *, overwrite: bool, wait_s: float,
                     hook: Callable[[str], None], retain: Callable[[str], None], started: float,
                     meter: Progress | None = None, direct: bool = False) -> None:
    """Phases 3 and 4, collective; logs the committed save. ``validated``: key -> level used."""
    records = write(comm, plan, produce, hook, meter, direct)
    manifest = build_manifest(plan, components, records, validated)
    commit(comm, plan, manifest, overwrite=overwrite, wait_s=wait_s, hook=hook, retain=retain)
    total = sum(c.size_bytes for c in manifest.components.values())
    note(comm.rank, "commit", "saved %s (%d components, %d files, %d bytes) in %.3f s", plan.path,
         len(manifest.components), sum(len(c.files) for c in manifest.components.values()),
         total, time.perf_counter() - started)
