"""Small rank functions for exercising :class:`distckpt.testing.pool.WorldPool` (and for quick manual checks).

Each takes a :class:`~distckpt.testing.worldspec.RankContext` first, as every rank function does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from .worldspec import RankContext

#: Variables torchrun sets for every worker; :func:`environment` reports them.
TORCHRUN_VARS: tuple[str, ...] = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "NODE_RANK",
)


def all_reduce_rank(ctx: RankContext, offset: float = 0.0) -> float:
    """All-reduce ``rank + offset`` over the world; every rank returns the sum."""
    t = torch.tensor([float(ctx.rank) + offset])
    dist.all_reduce(t)
    return float(t.item())


def environment(ctx: RankContext) -> dict[str, Any]:
    """The torchrun variables, the context and the process group as this rank sees them."""
    env: dict[str, Any] = {name: os.environ.get(name) for name in TORCHRUN_VARS}
    env["ctx"] = ctx
    env["pid"] = os.getpid()
    env["dist_rank"] = dist.get_rank()
    env["dist_world_size"] = dist.get_world_size()
    env["backend"] = str(dist.get_backend())
    return env


def set_env_var(ctx: RankContext, name: str, value: str) -> str | None:
    """Set an environment variable (which the pool must undo); return its previous value."""
    previous = os.environ.get(name)
    os.environ[name] = value
    return previous


def read_env_var(ctx: RankContext, name: str) -> str | None:
    """The value of one environment variable on this rank."""
    return os.environ.get(name)


def raise_on(ctx: RankContext, ranks: list[int], message: str = "boom") -> int:
    """Raise ``ValueError(message)`` on ``ranks``; the others return their rank."""
    if ctx.rank in ranks:
        raise ValueError(f"{message} on rank {ctx.rank}")
    return ctx.rank


def sigkill_on(ctx: RankContext, ranks: list[int]) -> int:
    """Ranks in ``ranks`` kill themselves with SIGKILL; the others return their rank."""
    if ctx.rank in ranks:
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.rank


def sigkill_then_collective(ctx: RankContext, ranks: list[int]) -> float:
    """Ranks in ``ranks`` die; the others enter an all-reduce that must fail, not hang."""
    if ctx.rank in ranks:
        os.kill(os.getpid(), signal.SIGKILL)
    return all_reduce_rank(ctx)


def hang_on(ctx: RankContext, ranks: list[int], seconds: float = 3600.0) -> int:
    """Ranks in ``ranks`` sleep (a hang); the others return at once."""
    if ctx.rank in ranks:
        _sleep_in_named_frame(seconds)
    return ctx.rank


def _sleep_in_named_frame(seconds: float) -> None:
    """A frame whose name shows up in stack dumps."""
    time.sleep(seconds)


def write_marker(ctx: RankContext, name: str) -> str:
    """Write ``<workdir>/<name>-<rank>`` and return the workdir."""
    with open(os.path.join(ctx.workdir, f"{name}-{ctx.rank}"), "w", encoding="utf-8") as f:
        f.write(str(ctx.rank))
    return ctx.workdir


def return_unpicklable(ctx: RankContext) -> Any:
    """Return a value that cannot be pickled (a lambda)."""
    return lambda: None


def exit_normally(ctx: RankContext, ranks: list[int], code: int = 3) -> int:
    """Ranks in ``ranks`` call ``os._exit(code)``; the others return their rank."""
    if ctx.rank in ranks:
        os._exit(code)
    return ctx.rank


def hang_in_teardown(ctx: RankContext, ranks: list[int]) -> int:
    """Ranks in ``ranks`` block forever when the harness destroys their process group.

    They replace ``torch.distributed.destroy_process_group`` in their own process,
    which the pool kills at the world's deadline, so the change dies with it.
    """
    if ctx.rank in ranks:

        def _block_in_teardown(group: Any = None) -> None:
            _sleep_in_named_frame(3600.0)

        dist.destroy_process_group = _block_in_teardown
    return ctx.rank


def freeze_when_idle(ctx: RankContext, ranks: list[int]) -> int:
    """Ranks in ``ranks`` return their pid, then ``SIGSTOP`` themselves once idle.

    A thread waits until the main thread is back in the pool's loop, reading its
    pipe for the next world, and stops the whole process there: a rank that is
    alive but never reads again. The others return their pid.
    """
    if ctx.rank in ranks:
        threading.Thread(target=_stop_when_idle, name="probe-freeze", daemon=True).start()
    return os.getpid()


def _stop_when_idle() -> None:
    main = threading.main_thread().ident
    while True:
        frame = sys._current_frames().get(main or 0)
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        if "serve" in names and "run_task" not in names and names & {"recv", "_recv_bytes"}:
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        time.sleep(0.01)


def payload_size(ctx: RankContext, payload: bytes) -> int:
    """The length of ``payload`` (a large argument makes the parent's send block)."""
    return len(payload)


def subgroup_all_reduce(ctx: RankContext) -> list[float]:
    """All-reduce ``rank`` in a new world group and in two halves (subgroups to tear down)."""
    half = max(1, ctx.world_size // 2)
    members = [list(range(ctx.world_size)), list(range(half)), list(range(half, ctx.world_size))]
    sums = []
    for ranks in members:
        if not ranks:
            continue
        group = dist.new_group(ranks, backend="gloo")  # every rank creates every group
        if ctx.rank in ranks:
            t = torch.tensor([float(ctx.rank)])
            dist.all_reduce(t, group=group)
            sums.append(float(t.item()))
    return sums
