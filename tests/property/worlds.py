"""Running drawn examples on threaded worlds (real coordinator, real files, no processes)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from distckpt import CheckpointCoordinator, CollectiveTimeoutError, StateComponent
from distckpt.testing import ThreadComm, ThreadWorld, run_threads
from tests.helpers import Box
from tests.property.strategies import Decl, Example, Topo

WORLD_TIMEOUT = 10.0


@contextmanager
def scratch() -> Iterator[str]:
    """A fresh output directory per hypothesis example (fixtures are not reset between examples)."""
    path = tempfile.mkdtemp(prefix="distckpt-prop-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(topo: Topo, fn: Callable[[ThreadComm], Any], timeout: float = WORLD_TIMEOUT) -> list[Any]:
    """``fn`` on every rank of a threaded world shaped like ``topo``; results or exceptions by rank."""
    return run_threads(ThreadWorld(topo.world_size, nodes=list(topo.node_of), timeout=timeout), fn)


def ok(results: list[Any]) -> list[Any]:
    """The results, or the most telling exception (a rank's own error before a peer's timeout)."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if not isinstance(e, CollectiveTimeoutError)), errors[0])
    return results


def component(decl: Decl, box: Any) -> StateComponent:
    return StateComponent(decl.key, box, decl.pattern, process_group_name=decl.group, required=decl.required,
                          validate_replication=decl.validate, validation_level=decl.level)


def coordinator(ex: Example, comm: ThreadComm, out: str, boxes: dict[str, Any],
                decls: tuple[Decl, ...] | None = None, **kw: Any) -> CheckpointCoordinator:
    decls = ex.decls if decls is None else decls
    return CheckpointCoordinator([component(d, boxes[d.key]) for d in decls],
                                 process_groups=ex.topo.groups_of(comm.rank), dist=comm, output_dir=out, **kw)


def save(ex: Example, out: str, generation: int = 0, *, states: Callable[[int], dict[str, Any]] | None = None,
         hook: Any = None, async_save: bool | None = None, coord_kw: dict[str, Any] | None = None,
         **save_kw: Any) -> list[Any]:
    """Every rank saves its states of ``generation`` (or ``states(rank)``); paths or exceptions by rank."""
    use_async = ex.async_save if async_save is None else async_save
    # Materialised up front, in this thread: a bad example fails here, not as a peer's timeout.
    per_rank = [states(r) if states else {d.key: ex.state(d.key, r, generation) for d in ex.decls}
                for r in range(ex.topo.world_size)]

    def fn(comm: ThreadComm) -> str:
        boxes = {k: Box(v) for k, v in per_rank[comm.rank].items()}
        c = coordinator(ex, comm, out, boxes, phase_hook=hook, **(coord_kw or {}))
        if use_async:
            return c.save_checkpoint(validate=ex.save_validate, async_save=True,
                                     background_staging=ex.background_staging, **save_kw).result(WORLD_TIMEOUT)
        return c.save_checkpoint(validate=ex.save_validate, **save_kw)

    return run(ex.topo, fn)


def load(ex: Example, out: str, path: str | None = None, extra: tuple[Decl, ...] = (), hook: Any = None,
         **load_kw: Any) -> list[Any]:
    """Every rank loads into empty boxes; ``(report, {key: state})`` or exceptions by rank."""
    def fn(comm: ThreadComm) -> tuple[Any, dict[str, Any]]:
        decls = ex.decls + extra
        boxes = {d.key: Box(None) for d in decls}
        report = coordinator(ex, comm, out, boxes, decls=decls, phase_hook=hook).load_checkpoint(path, **load_kw)
        return report, {k: b.state for k, b in boxes.items()}

    return run(ex.topo, fn)


def checkpoints_listing(out: str) -> list[str]:
    d = os.path.join(out, "checkpoints")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []
