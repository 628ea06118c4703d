"""Rank functions for faults on real gloo worlds (module level, so the pool can pickle them).

Each runs on every rank with torch.distributed initialised by the harness and
reports what happened as plain data: a rank never draws, never asserts on its
peers, and a fault is described by a :class:`Fault` built in the parent.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch.distributed

from distckpt import CheckpointCoordinator, CheckpointError, StateComponent
from tests.faults.scenario import check_loaded
from tests.helpers import Box
from tests.property.gloo_ranks import process_groups
from tests.property.strategies import Decl, Example

#: The coordinator timeout of fault worlds: small, so a dead peer costs seconds.
TIMEOUT = 4.0
#: The timeout of worlds where nothing is meant to fail (a loaded machine must not fail them).
CALM_TIMEOUT = 30.0


@dataclass(frozen=True)
class Fault:
    """What goes wrong, on which rank, from which phase.

    kind: "none"; "kill" (SIGKILL itself at ``phase``); "raise" (an exception
    at ``phase``); "rlimit" (a real RLIMIT_FSIZE of ``limit`` bytes for the
    whole save); "enospc" (os.write fails with ENOSPC from ``phase`` on);
    "absent" (builds the coordinator, then sleeps ``limit`` seconds instead of
    calling save).
    """

    kind: str = "none"
    rank: int = -1
    phase: str = ""
    limit: float = 0


def _component(d: Decl, box: Any) -> StateComponent:
    return StateComponent(d.key, box, d.pattern, process_group_name=d.group, required=d.required,
                          validate_replication=d.validate, validation_level=d.level)


def _coordinator(ctx: Any, ex: Example, out: str, boxes: dict[str, Box], decls: tuple[Decl, ...] | None = None,
                 **kw: Any) -> CheckpointCoordinator:
    decls = ex.decls if decls is None else decls
    groups = process_groups(ex, ctx.rank)
    return CheckpointCoordinator([_component(d, boxes[d.key]) for d in decls], process_groups=groups,
                                 output_dir=out, timeout=kw.pop("timeout", TIMEOUT), **kw)


def _error(exc: CheckpointError) -> dict[str, Any]:
    return {"error": type(exc).__name__, "failures": dict(exc.failures), "message": str(exc), "phase": exc.phase}


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """A real RLIMIT_FSIZE for this process (SIGXFSZ ignored, so write() fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class _NoSpace:
    """os.write / os.writev that fail with ENOSPC on regular files once armed (pipes and sockets untouched)."""

    def __init__(self) -> None:
        self.armed = False

    def wrap(self, real: Any) -> Any:
        def failing(fd: int, data: Any) -> int:
            if self.armed and stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            result: int = real(fd, data)
            return result
        return failing


def save(ctx: Any, ex: Example, out: str, generation: int = 0, fault: Fault = Fault(),
         checkpoint_id: str | None = None, timeout: float = TIMEOUT, direct_io: bool = False) -> dict[str, Any]:
    """Every rank saves generation ``generation``; ``fault`` strikes one rank. Returns what happened.
    ``direct_io``: the coordinators write with ``O_DIRECT``."""
    boxes = {d.key: Box(ex.state(d.key, ctx.rank, generation)) for d in ex.decls}
    mine = fault.rank == ctx.rank
    nospace = _NoSpace()

    def hook(phase: str, rank: int) -> None:
        if not mine or phase != fault.phase:
            return
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.kind == "raise":
            raise OSError(errno.EIO, f"injected on rank {rank} in {phase}")
        if fault.kind == "enospc":
            nospace.armed = True

    coordinator = _coordinator(ctx, ex, out, boxes, phase_hook=hook, timeout=timeout, direct_io=direct_io)
    if fault.kind == "kill":
        # Every rank has finished building the coordinator's gloo channel before the victim can
        # reach its phase: a rank killed while a peer is still connecting the channel's mesh makes
        # that peer's constructor fail inside gloo ("connectFullMesh failed ... closed by peer"),
        # which is not the fault under test (it made [plan-3] fail now and then).
        torch.distributed.barrier()
    if mine and fault.kind == "absent":
        time.sleep(fault.limit)
        return {"rank": ctx.rank, "absent": True}
    result: dict[str, Any] = {"rank": ctx.rank}
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            if mine and fault.kind == "rlimit":
                stack.enter_context(_file_size_limit(int(fault.limit)))
            if mine and fault.kind == "enospc":
                for name in ("write", "writev"):
                    real = getattr(os, name)
                    setattr(os, name, nospace.wrap(real))
                    stack.callback(setattr, os, name, real)
            result["path"] = coordinator.save_checkpoint(checkpoint_id=checkpoint_id)
    except CheckpointError as exc:
        result.update(_error(exc))
    result["elapsed"] = time.monotonic() - started
    return result


def load(ctx: Any, ex: Example, out: str, generation: int = 0, path: str | None = None,
         decls: tuple[Decl, ...] | None = None, strict: bool = True, timeout: float = CALM_TIMEOUT) -> dict[str, Any]:
    """Every rank loads (latest by default) and checks what it got against generation ``generation``."""
    decls = ex.decls if decls is None else decls
    boxes = {d.key: Box(None) for d in decls}
    reads: list[str] = []
    coordinator = _coordinator(ctx, ex, out, boxes, decls=decls, timeout=timeout,
                               phase_hook=lambda phase, rank: reads.append(phase))
    try:
        report = coordinator.load_checkpoint(path, strict=strict)
    except CheckpointError as exc:
        return {"rank": ctx.rank, "phases": reads, **_error(exc)}
    check_loaded(replace(ex, decls=decls), ctx.rank, {k: b.state for k, b in boxes.items()}, generation)
    return {"rank": ctx.rank, "path": report.path, "phases": reads}


def recover(ctx: Any, ex: Example, out: str, expected_generation: int, new_generation: int) -> dict[str, Any]:
    """After a crash: load latest (must be ``expected_generation``), then save ``new_generation``."""
    loaded = load(ctx, ex, out, expected_generation)
    if "error" in loaded:
        return loaded
    saved = save(ctx, ex, out, new_generation, timeout=CALM_TIMEOUT)
    return {"rank": ctx.rank, "loaded": loaded["path"], **saved}


def declare_differently(ctx: Any, ex: Example, out: str, what: str, odd_rank: int) -> dict[str, Any]:
    """Rank ``odd_rank`` declares something else than its peers; every rank tries to save."""
    decls = list(ex.decls)
    if ctx.rank == odd_rank:
        if what == "an extra component":
            decls.append(Decl("extra", "global"))
        elif what == "a missing component":
            decls = [d for d in decls if d.key != "trainer"]
        elif what == "another pattern":
            decls = [replace(d, pattern="replicated") if d.key == "rng" else d for d in decls]
        elif what == "another group":
            decls = [replace(d, group="tp") if d.key == "model" else d for d in decls]
        elif what == "another validation level":
            decls = [replace(d, level="quick") if d.key == "scheduler" else d for d in decls]
        else:
            raise ValueError(what)
    boxes = {d.key: Box(ex.state(d.key, ctx.rank)) if d.key in ex.bases else Box({}) for d in decls}
    coordinator = _coordinator(ctx, ex, out, boxes, decls=tuple(decls))
    try:
        return {"rank": ctx.rank, "path": coordinator.save_checkpoint()}
    except CheckpointError as exc:
        return {"rank": ctx.rank, **_error(exc)}
