"""Rank functions for the collective error protocol (issue 11, items 5-7, 9, 11, 13).

Module level, so the warm pool can pickle them. Each runs on every rank of a
real gloo world and reports what happened as plain data; the parent asserts.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from distckpt import CheckpointError
from tests.faults.ranks import CALM_TIMEOUT, TIMEOUT, _coordinator, _error
from tests.helpers import Box
from tests.property.strategies import Example


def _outcome(call: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        value = call()
    except CheckpointError as exc:
        return {**_error(exc), "elapsed": time.monotonic() - started}
    except Exception as exc:  # a raw error escaping the protocol is what these tests look for
        return {"raw": f"{type(exc).__name__}: {exc}", "elapsed": time.monotonic() - started}
    path = getattr(value, "path", value)
    return {"path": str(path), "elapsed": time.monotonic() - started}


def _boxes(ex: Example, rank: int, generation: int = 0) -> dict[str, Box]:
    return {d.key: Box(ex.state(d.key, rank, generation)) for d in ex.decls}


def disagree(ctx: Any, ex: Example, out: str, op: str, argument: str, odd_rank: int) -> dict[str, Any]:
    """Every rank calls ``op`` ("save" or "load"); ``odd_rank`` passes another ``argument``."""
    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank))
    if op == "load":
        coordinator.save_checkpoint(checkpoint_id="base")
    odd = ctx.rank == odd_rank
    kwargs: dict[str, Any] = {}
    if argument == "checkpoint_path":
        kwargs["checkpoint_path"] = os.path.join(out, "checkpoints", "other" if odd else "checkpoint-base")
        if op == "save":
            kwargs["checkpoint_path"] = os.path.join(out, "elsewhere" if odd else "here")
    elif argument == "checkpoint_id":
        kwargs["checkpoint_id"] = "7" if odd else "6"
    elif argument in ("validate", "async_save", "overwrite"):
        kwargs[argument] = odd
    elif argument == "strict":
        kwargs["strict"] = not odd
    else:
        raise ValueError(argument)
    if op == "save":
        def call() -> Any:
            result = coordinator.save_checkpoint(**kwargs)
            return result.result(CALM_TIMEOUT) if kwargs.get("async_save") else result
        return {"rank": ctx.rank, **_outcome(call)}
    return {"rank": ctx.rank, **_outcome(lambda: coordinator.load_checkpoint(**kwargs))}


def incompatible_on_one_rank(ctx: Any, ex: Example, out: str, odd_rank: int) -> dict[str, Any]:
    """Save; then load where ``odd_rank`` alone finds the checkpoint incompatible."""
    from distckpt import ComponentMismatchError, loading

    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank))
    coordinator.save_checkpoint()
    check = loading.check_compatible
    if ctx.rank == odd_rank:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise ComponentMismatchError("component 'model' does not fit here (injected on one rank)")
        loading.check_compatible = refuse  # this rank's process only; put back below
    phases: list[str] = []
    coordinator.phase_hook = lambda phase, rank: phases.append(phase)
    try:
        return {"rank": ctx.rank, **_outcome(coordinator.load_checkpoint), "phases": phases}
    finally:
        loading.check_compatible = check


def die_before_broadcast(ctx: Any, ex: Example, out: str, victim: int) -> dict[str, Any]:
    """Save; then load with read_and_broadcast, where ``victim`` dies as the broadcasts begin."""
    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank), load_strategy="read_and_broadcast")
    coordinator.save_checkpoint()
    if ctx.rank == victim:
        def die(*args: Any, **kwargs: Any) -> None:
            os.kill(os.getpid(), signal.SIGKILL)
        coordinator._comm.broadcast_in_sets = die
    return {"rank": ctx.rank, **_outcome(coordinator.load_checkpoint)}


def die_during_broadcast(ctx: Any, ex: Example, out: str, victim: int) -> dict[str, Any]:
    """Save; then load with read_and_broadcast, where ``victim`` dies inside the broadcast step
    (after every rank arrived and its replica set's group was built)."""
    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank), load_strategy="read_and_broadcast")
    coordinator.save_checkpoint()
    comm: Any = coordinator._comm
    # Where the replica-set group is built: TorchComm._set_group, or (before issue 11) dist.new_group.
    owner, name = (comm, "_set_group") if hasattr(comm, "_set_group") else (comm._dist, "new_group")
    build = getattr(owner, name)

    def build_then_die(members: Any, *args: Any, **kwargs: Any) -> Any:
        group = build(members, *args, **kwargs)
        if ctx.rank in members:
            os.kill(os.getpid(), signal.SIGKILL)
        return group
    if ctx.rank == victim:
        setattr(owner, name, build_then_die)
    try:
        return {"rank": ctx.rank, **_outcome(coordinator.load_checkpoint)}
    finally:
        if owner is not comm and ctx.rank == victim:
            setattr(owner, name, build)


class _Refuses(Box):
    """A Stateful whose load_state_dict fails (after its tensors may have been read into)."""

    def load_state_dict(self, state: Any) -> None:
        raise RuntimeError("load_state_dict refused the state (injected)")


def fail_one_load(ctx: Any, ex: Example, out: str, odd_rank: int, odd_key: str, in_place: bool) -> dict[str, Any]:
    """Save generation 0; load it into generation-1 state where ``odd_rank``'s ``odd_key`` refuses."""
    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank))
    coordinator.save_checkpoint()
    boxes = _boxes(ex, ctx.rank, generation=1)
    if ctx.rank == odd_rank:
        boxes[odd_key] = _Refuses(boxes[odd_key].state)
    loader = _coordinator(ctx, ex, out, boxes, load_in_place=in_place)
    return {"rank": ctx.rank, **_outcome(loader.load_checkpoint)}


def straggle(ctx: Any, ex: Example, out: str, late: int, delay: float) -> dict[str, Any]:
    """``late`` arrives ``delay`` s after its peers gave up on a save; then every rank saves and loads again."""
    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank))
    if ctx.rank == late:
        time.sleep(delay)
    first = _outcome(lambda: coordinator.save_checkpoint(checkpoint_id="first"))
    second = _outcome(lambda: coordinator.save_checkpoint(checkpoint_id="second"))
    third = _outcome(lambda: coordinator.load_checkpoint())
    return {"rank": ctx.rank, "first": first, "second": second, "load": third}


def interrupt(ctx: Any, ex: Example, out: str, victim: int, phase: str) -> dict[str, Any]:
    """Every rank saves; ``victim`` gets a KeyboardInterrupt at the start of ``phase``."""
    def hook(at: str, rank: int) -> None:
        if rank == victim and at == phase:
            raise KeyboardInterrupt

    coordinator = _coordinator(ctx, ex, out, _boxes(ex, ctx.rank), phase_hook=hook, timeout=TIMEOUT)
    from distckpt import storage

    real = storage.commit_directory
    if phase == "publish" and ctx.rank == victim:  # rank 0 alone publishes the commit (an announce)
        def interrupted(*args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt
        storage.commit_directory = interrupted
    started = time.monotonic()
    try:
        return {"rank": ctx.rank, **_outcome(coordinator.save_checkpoint)}
    except KeyboardInterrupt:
        return {"rank": ctx.rank, "interrupted": True, "elapsed": time.monotonic() - started}
    finally:
        storage.commit_directory = real  # the rank process serves later worlds
