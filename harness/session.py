"""What one rank does in each world of a scenario run (module level, so it pickles).

A positive scenario takes three worlds: :func:`reference` trains ``steps``
steps uninterrupted; :func:`save` trains ``save_at`` steps and saves;
:func:`resume` starts from a *fresh* trainer, loads and trains to ``steps``.
An elastic scenario replaces the reference by :func:`handoff_start` (train to
``save_at`` in the saving world, hand the state over in memory) and
:func:`handoff_finish` (restore it in the resuming world without distckpt and
train to the end). The same functions serve :mod:`harness.worker` under torchrun.

Library errors are caught and returned as :class:`LibraryError` values (with
``failures`` and the class hierarchy), since a ``CheckpointError`` pickled as an
exception would lose them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from distckpt import CheckpointCoordinator, CheckpointError
from distckpt.testing.pool import RankContext
from harness.patterns import load_imports
from harness.scenario import ComponentSpec, FaultSpec, Scenario, Topology
from harness.trainers import Trainer, trainer_class

__all__ = [
    "LibraryError",
    "RankRun",
    "handoff_finish",
    "handoff_start",
    "reference",
    "resume",
    "save",
]


@dataclass
class LibraryError:
    """A distckpt error as one rank saw it."""

    error_type: str
    classes: tuple[str, ...]
    message: str
    failures: dict[int, str]
    phase: str | None

    @classmethod
    def of(cls, exc: CheckpointError) -> LibraryError:
        return cls(
            error_type=type(exc).__name__,
            classes=tuple(c.__name__ for c in type(exc).__mro__),
            message=str(exc),
            failures=dict(exc.failures),
            phase=exc.phase,
        )


@dataclass
class RankRun:
    """What one rank reports from one world."""

    rank: int
    losses: list[float] = field(default_factory=list)
    fingerprint: dict[str, dict[str, str]] = field(default_factory=dict)
    path: str | None = None
    seconds: float = 0.0
    loaded: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    error: LibraryError | None = None
    state: dict[str, Any] | None = None


def cuda_index(ctx: RankContext) -> int:
    """This rank's GPU: ``LOCAL_RANK``, or the global rank when this host has a GPU per rank.

    Several torchrun agents on one host (simulated nodes) share its GPUs, so
    ``LOCAL_RANK`` would put two ranks on one GPU; when the host has at least
    as many GPUs as the world has ranks, the global rank picks a distinct one.
    On a real cluster with fewer GPUs per host than ranks, ``LOCAL_RANK`` it is.
    """
    count = torch.cuda.device_count()
    return ctx.rank if count >= ctx.world_size else ctx.local_rank


def device_for(ctx: RankContext) -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if ctx.backend == "nccl":
        return torch.device("cuda", cuda_index(ctx))
    return torch.device("cpu")


def build_trainer(
    ctx: RankContext, scenario: Scenario, topology: Topology, *, fresh: bool
) -> Trainer:
    """The scenario's trainer for this rank."""
    if ctx.backend == "nccl":
        torch.cuda.set_device(cuda_index(ctx))
    return trainer_class(scenario.trainer)(scenario, topology, device_for(ctx), fresh=fresh)


def coordinator(
    ctx: RankContext,
    scenario: Scenario,
    trainer: Trainer,
    hook: Callable[[str, int], None] | None = None,
    declarations: tuple[ComponentSpec, ...] | None = None,
) -> CheckpointCoordinator:
    """A coordinator over ``declarations`` (default: the saving world's), writing under ``ctx.workdir``.

    Imports the scenario's pattern modules first (a rank process does not inherit the
    parent's imports), then declares every component with its pattern object."""
    load_imports(scenario.imports)
    available = trainer.components()
    declared = scenario.components if declarations is None else declarations
    components = [c.component(available[c.key]) for c in declared]
    options: dict[str, Any] = {}
    if scenario.run.min_part_bytes is not None:
        options["min_part_bytes"] = scenario.run.min_part_bytes
    if scenario.run.load_strategy is not None:
        options["load_strategy"] = scenario.run.load_strategy
    if scenario.run.direct_io:
        options["direct_io"] = True
    return CheckpointCoordinator(
        components,
        process_groups=trainer.process_groups(),
        output_dir=ctx.workdir,
        timeout=scenario.run.timeout,
        phase_hook=hook,
        **options,
    )


def _train(trainer: Trainer, steps: range) -> list[float]:
    return [trainer.train_step() for _ in steps]


def reference(ctx: RankContext, scenario: Scenario) -> RankRun:
    """Train ``steps`` steps uninterrupted."""
    trainer = build_trainer(ctx, scenario, scenario.topology, fresh=False)
    losses = _train(trainer, range(scenario.run.steps))
    return RankRun(ctx.rank, losses=losses, fingerprint=trainer.fingerprint())


def _fault_hook(faults: tuple[FaultSpec, ...]) -> Callable[[str, int], None] | None:
    acting = [f for f in faults if f.kind in ("raise", "sigkill")]
    if not acting:
        return None

    def hook(phase: str, rank: int) -> None:
        for f in acting:
            if f.phase == phase and rank in f.ranks:
                if f.kind == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault: {f.kind} in phase {phase} on rank {rank}")

    return hook


def save(ctx: RankContext, scenario: Scenario) -> RankRun:
    """Train ``save_at`` steps, apply diverge faults, save (faults in the phase hook)."""
    trainer = build_trainer(ctx, scenario, scenario.topology, fresh=False)
    losses = _train(trainer, range(scenario.run.save_at))
    for fault in scenario.faults:
        if fault.kind == "diverge" and ctx.rank in fault.ranks:
            assert fault.component is not None
            trainer.diverge(fault.component)
    coord = coordinator(ctx, scenario, trainer, _fault_hook(scenario.faults))
    started = time.perf_counter()
    try:
        path = _save(coord, trainer, scenario)
    except CheckpointError as exc:
        return RankRun(
            ctx.rank,
            losses=losses,
            seconds=time.perf_counter() - started,
            error=LibraryError.of(exc),
        )
    return RankRun(ctx.rank, losses=losses, path=path, seconds=time.perf_counter() - started)


def _save(coord: CheckpointCoordinator, trainer: Trainer, scenario: Scenario) -> str:
    """Save as ``scenario.run.save_mode`` says. The asynchronous modes go on training as a trainer
    would: the next step's forward and backward run while the save is in flight (with background
    staging: before the host copy is done, so the trainer waits for it before the optimizer step,
    which changes the saved tensors). That step is not part of the checkpoint: the resume must still
    match the uninterrupted reference bit for bit."""
    mode = scenario.run.save_mode
    checkpoint_id, validate = str(scenario.run.save_at), scenario.run.validate
    if mode == "sync":
        return coord.save_checkpoint(checkpoint_id=checkpoint_id, validate=validate)
    handle = coord.save_checkpoint(checkpoint_id=checkpoint_id, validate=validate, async_save=True,
                                   background_staging=mode == "async_background_staging")
    trainer.train_step(before_update=handle.wait_staged)
    return handle.result()


def resume(ctx: RankContext, scenario: Scenario, topology: Topology) -> RankRun:
    """Fresh trainer in ``topology``, load the latest checkpoint, train to ``steps``.

    The resuming world declares ``scenario.resuming`` and loads with ``strict=scenario.resume_strict``.
    """
    trainer = build_trainer(ctx, scenario, topology, fresh=True)
    coord = coordinator(ctx, scenario, trainer, declarations=scenario.resuming)
    started = time.perf_counter()
    try:
        report = coord.load_checkpoint(strict=scenario.resume_strict)
    except CheckpointError as exc:
        return RankRun(ctx.rank, seconds=time.perf_counter() - started, error=LibraryError.of(exc))
    seconds = time.perf_counter() - started
    losses = _train(trainer, range(scenario.run.save_at, scenario.run.steps))
    return RankRun(
        ctx.rank,
        losses=losses,
        fingerprint=trainer.fingerprint(),
        path=report.path,
        seconds=seconds,
        loaded=tuple(report.loaded),
        skipped=dict(report.skipped),
    )


def handoff_start(ctx: RankContext, scenario: Scenario) -> RankRun:
    """Elastic reference, part 1: train to ``save_at`` and return every component's state."""
    trainer = build_trainer(ctx, scenario, scenario.topology, fresh=False)
    losses = _train(trainer, range(scenario.run.save_at))
    return RankRun(ctx.rank, losses=losses, state=trainer.state_snapshot())


def handoff_finish(ctx: RankContext, scenario: Scenario, states: dict[str, Any]) -> RankRun:
    """Elastic reference, part 2: restore ``states`` in memory (no distckpt) and train on.

    ``states`` maps each declared component to the state this rank should get
    (rank 0's, for the GLOBAL and REPLICATED components an elastic scenario
    may declare).
    """
    trainer = build_trainer(ctx, scenario, scenario.resume_topology, fresh=True)
    available = trainer.components()
    for key, state in states.items():
        available[key].load_state_dict(state)
    losses = _train(trainer, range(scenario.run.save_at, scenario.run.steps))
    return RankRun(ctx.rank, losses=losses, fingerprint=trainer.fingerprint())
