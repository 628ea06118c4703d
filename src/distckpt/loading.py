"""The load phases: resolve, check compatibility, read.

Called by the coordinator's facade (:meth:`CheckpointCoordinator.load_checkpoint`)
on every rank. Every phase ends in an error-carrying collective, so a failure
on any rank is raised on every rank at the same step:

1. :func:`resolve`: every rank reports its node, groups and declarations and
   checks agreement; rank 0 finds the checkpoint and broadcasts its manifest
   (or says it is a legacy checkpoint).
2. :func:`compatible_everywhere`: every rank checks that the checkpoint fits
   its declarations and world (:func:`check_compatible`), before any data is
   read; one rank's refusal fails every rank at once.
3. :func:`read` (or :func:`read_legacy`): every rank reads, verifies and
   restores its replica set's files, into its live tensors where they match;
   with ``read_and_broadcast`` the lowest rank of each set reads and the bytes
   travel within the set. A failed read names, per rank, the components whose
   live state it had already changed.

The number of collectives does not depend on the number of components.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import storage
from .codec import tensor_bytes
from .collectives import Comm, announce, exchange
from .components import StateComponent
from .dtensor import restore as restore_dtensors
from .errors import (
    CheckpointNotFoundError,
    ComponentMismatchError,
    IntegrityError,
    ManifestError,
    TopologyMismatchError,
)
from .legacy import is_legacy_checkpoint, load_legacy
from .manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest, FileEntry
from .patterns import Pattern, pattern_from_record
from .planning import agree
from .progress import Progress
from .reading import decode_files, read_component, read_files, read_layouts
from .report import LoadReport
from .statecheck import check_live_state
from .topology import Topology
from .transport import SetBroadcastComm, check_comm

__all__ = [
    "LOAD_STRATEGIES",
    "check_compatible",
    "compatible_everywhere",
    "find",
    "read",
    "read_legacy",
    "resolve",
]

LOAD_STRATEGIES = ("every_member_reads", "read_and_broadcast")


def resolve(
    comm: Comm, report: Callable[..., Any], locate: Callable[[], str], strict: bool,
    hook: Callable[[str], None], args: Mapping[str, Any],
) -> tuple[str, CheckpointManifest | None, Topology, list[str]]:
    """Phase 1 of load, collective: all agree on the call and the world; rank 0 finds the
    checkpoint (``locate()``, e.g. :func:`find`) and broadcasts its manifest.

    Returns ``(path, manifest or None for a legacy checkpoint, topology,
    unlisted files)``. With ``strict``, files in the checkpoint that its
    manifest does not list raise :class:`IntegrityError` on every rank.
    """
    names: list[str] = []  # this rank's group names, to decode the compact reports

    def work() -> bytes:
        hook("resolve")
        names[:] = sorted(report(True)["groups"])
        out: bytes = report()
        return out

    topology = agree(exchange(comm, "resolve", work, agree=args),
                     lambda: exchange(comm, "resolve", lambda: report(True)), phase="resolve", names=names)

    def look() -> tuple[str, dict[str, Any] | None, list[str]]:  # rank 0 only
        path = locate()
        if not path:  # nothing to load, and the caller said that is fine (missing_ok)
            return path, None, []
        manifest_file = os.path.join(path, MANIFEST_NAME)
        if not storage.path_info(manifest_file).exists and is_legacy_checkpoint(path):
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

    path, raw, unlisted = announce(comm, "resolve", look)
    if not path:
        return path, None, topology, []
    manifest = None if raw is None else CheckpointManifest.from_dict(raw, where=os.path.join(path, MANIFEST_NAME))
    return path, manifest, topology, unlisted


def find(checkpoint_path: Any, checkpoints_dir: str, latest: Callable[[], str | None],
         missing_ok: bool = False) -> str:
    """Rank 0: the checkpoint directory to load; ``None`` means ``latest()`` under ``checkpoints_dir``.

    Raises :class:`CheckpointNotFoundError` when there is none, or the path
    is a symlink or not a directory; with ``missing_ok``, returns ``""`` when
    there is none or no directory at the path (a symlink is still refused).
    """
    if checkpoint_path is None:
        newest = latest()
        if newest is None and missing_ok:
            return ""
        if newest is None:
            raise CheckpointNotFoundError(
                f"{checkpoints_dir}: no committed checkpoint to load (incomplete or corrupt "
                "directories are ignored)"
            )
        return newest
    path: str = os.path.abspath(os.fspath(checkpoint_path))
    if storage.path_info(path).link:
        raise CheckpointNotFoundError(f"{path}: checkpoint directory is a symlink; refusing to follow it")
    if not storage.path_info(path).dir:
        if missing_ok:
            return ""
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory")
    return path


def compatible_everywhere(
    comm: Comm, path: str, manifest: CheckpointManifest, topology: Topology,
    components: Sequence[StateComponent], strict: bool,
) -> tuple[dict[str, ComponentManifest], dict[str, str]]:
    """Collective: :func:`check_compatible` on every rank, then one verdict for all.

    One rank's compatibility failure fails every rank at once, before any
    data is read (not a peer waiting out the timeout in the read phase).
    """
    checked: list[tuple[dict[str, ComponentManifest], dict[str, str]]] = []

    def work() -> None:
        checked.append(check_compatible(path, manifest, topology, components, strict))
        check_live_state(path, checked[0][0], components, comm.rank, strict,  # shapes, dtypes, keys
                         lambda entries: read_layouts(path, entries))

    exchange(comm, "resolve", work)
    return checked[0]


def check_compatible(
    path: str, manifest: CheckpointManifest, topology: Topology, components: Sequence[StateComponent], strict: bool,
) -> tuple[dict[str, ComponentManifest], dict[str, str]]:
    """Every rank, before reading data: what to load, what to skip, or why not.

    Returns ``(key -> saved component to load, key -> reason skipped)``.
    Raises :class:`TopologyMismatchError` when a non-elastic component's
    replica sets differ in this world, else :class:`ComponentMismatchError`
    for missing, undeclared or differently declared components.
    """
    actions: dict[str, ComponentManifest] = {}
    skipped: dict[str, str] = {}
    problems: list[str] = []
    topo_problems: list[str] = []
    for c in components:
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
    undeclared = sorted(set(manifest.components) - {c.key for c in components})
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


def read(
    comm: Comm, path: str, manifest: CheckpointManifest, actions: Mapping[str, ComponentManifest],
    skipped: Mapping[str, str], components: Mapping[str, StateComponent], *, in_place: bool, strategy: str,
    hook: Callable[[str], None], bar: bool = False,
) -> LoadReport:
    """Phase 2 of load, collective: read, verify and restore this rank's file of every component.

    ``in_place``: read into the live ``state_dict()`` tensors where they
    match. ``strategy``: one of :data:`LOAD_STRATEGIES`. ``bar``: a progress
    bar on rank 0 (:mod:`distckpt.progress`; long reads are logged either way).
    """
    files: dict[str, str] = {}
    touched: list[str] = []
    meter = Progress("read", comm.rank, sum(e.size_bytes for key, saved in actions.items()
                                            for e in saved.files_for_rank(comm.rank, components[key].pattern.elastic)),
                     bar=bar)

    def work() -> None:
        hook("read")
        for key, saved in actions.items():
            entries = saved.files_for_rank(comm.rank, components[key].pattern.elastic)
            stateful = components[key].stateful
            live = stateful.state_dict() if in_place else None
            if live is not None:
                touched.append(key)  # read_component writes into these tensors
            restore = functools.partial(_restore, source=stateful.state_dict if live is None else live,
                                        where=entries[0].path, in_place=live is not None)
            state = read_component(path, entries, live, meter.add, restore)
            if live is None:
                touched.append(key)
            stateful.load_state_dict(state)
            files[key] = entries[0].path

    try:
        if strategy == "read_and_broadcast" and comm.world_size > 1:
            _read_and_broadcast(comm, path, actions, components, files, touched, hook, in_place, meter.add)
        else:
            exchange(comm, "read", work, note=lambda: _modified(touched))
    finally:
        meter.close()
    return LoadReport(path=path, checkpoint_id=manifest.checkpoint_id, loaded=tuple(actions),
                      skipped=dict(skipped), files=files)


def _read_and_broadcast(comm: Comm, path: str, actions: Mapping[str, ComponentManifest],
                        components: Mapping[str, StateComponent], files: dict[str, str], touched: list[str],
                        hook: Callable[[str], None], in_place: bool, progress: Callable[[int], None]) -> None:
    """Phase 2 of load, ``read_and_broadcast``: the lowest rank of each set reads and verifies
    its files, every rank hears whether all reads succeeded, the bytes go out within each set
    (a gloo group per set), and every rank decodes and restores. ``progress(nbytes)`` counts
    each file as its reader has read it, and on the other members once it has arrived."""
    check_comm(comm, SetBroadcastComm, "load_strategy='read_and_broadcast'")  # checked at construction too
    assert isinstance(comm, SetBroadcastComm)
    sets = {key: _load_sets(saved, comm.world_size, components[key].pattern.elastic)
            for key, saved in actions.items()}
    entries: dict[str, tuple[FileEntry, ...]] = {}  # key -> this rank's files of it (found in the first step)
    reads: set[str] = set()  # the keys this rank reads (the others arrive by broadcast)
    buffers: dict[str, list[torch.Tensor]] = {}

    def fetch() -> None:
        hook("read")
        for key, saved in actions.items():
            mine = entries[key] = saved.files_for_rank(comm.rank, components[key].pattern.elastic)
            if min(next(m for m in sets[key] if comm.rank in m)) == comm.rank:
                reads.add(key)
                buffers[key] = [torch.frombuffer(b, dtype=torch.uint8) for b in read_files(path, mine)]
                progress(sum(e.size_bytes for e in mine))
            else:
                buffers[key] = [torch.empty(e.size_bytes, dtype=torch.uint8) for e in mine]

    def restore() -> None:
        for key in actions:
            mine = entries[key]
            state = decode_files(path, mine, [tensor_bytes(t) for t in buffers[key]])
            touched.append(key)
            stateful = components[key].stateful
            stateful.load_state_dict(restore_dtensors(state, stateful.state_dict, mine[0].path, in_place))
            files[key] = mine[0].path

    exchange(comm, "read", fetch)
    for key in actions:
        comm.broadcast_in_sets(sets[key], buffers[key], "read")
        if key not in reads:
            progress(sum(e.size_bytes for e in entries[key]))
    exchange(comm, "read", restore, note=lambda: _modified(touched))


def read_legacy(comm: Comm, path: str, topology: Topology, components: Sequence[StateComponent], strict: bool,
                hook: Callable[[str], None]) -> LoadReport:
    """Phase 2 of load for a checkpoint of the legacy layout (no manifest), collective."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        hook("read")
        outcome["report"] = load_legacy(path, components, topology, comm.rank, strict)

    exchange(comm, "read", work)
    report: LoadReport = outcome["report"]
    return report


def _restore(state: Any, source: Any, where: str, in_place: bool) -> Any:
    """The DTensors of a decoded ``state`` put back into the live layout (:func:`distckpt.dtensor.restore`)."""
    return restore_dtensors(state, source, where, in_place)


def _modified(touched: Sequence[str]) -> str:
    """This rank's line in a failed load's error: which components' live state changed."""
    if not touched:
        return "changed no live state"
    return f"changed the live state of {list(touched)} (loaded, or read into in place)"


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


def _sets_text(sets: Sequence[Sequence[int]]) -> str:
    text = str([list(s) for s in sets])
    return text if len(text) <= 120 else text[:117] + "..."
