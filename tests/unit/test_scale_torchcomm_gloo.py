"""TorchComm's sized rounds (lengths first, then payloads packed) on a real gloo world.

Worlds small enough to launch take the one-round slots; these ranks turn the
slots off (``wire.SLOTTED_WORLD_BYTES = 0``), so every all-gather takes the
rounds that 16,384 ranks would take, and check that payloads, errors and a
missing rank come out as with the slots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from distckpt.testing.pool import WorldPool
from distckpt.testing.worldspec import WorldSpec

TIMEOUT_S = 4.0


def sized_collectives(ctx: Any) -> dict[str, Any]:
    """All-gathers of small, mixed and empty-ish payloads, a broadcast, and an exchange where rank 1 fails."""
    from distckpt import CheckpointError, wire
    from distckpt.collectives import TorchComm, exchange

    saved = wire.SLOTTED_WORLD_BYTES
    wire.SLOTTED_WORLD_BYTES = 0
    try:
        comm = TorchComm(30.0)
        small = comm.all_gather({"rank": ctx.rank}, "small")
        mixed = comm.all_gather("x" * (100_000 if ctx.rank == 1 else 10) + str(ctx.rank), "mixed")
        nothing = comm.all_gather(None, "none")
        told = comm.broadcast(list(range(2000)) if ctx.rank == 0 else None, "told")

        def work() -> int:
            if ctx.rank == 1:
                raise ValueError("rank 1 cannot plan")
            return ctx.rank

        try:
            exchange(comm, "plan", work)
            failed: dict[str, Any] = {"raised": None}
        except CheckpointError as exc:
            failed = {"raised": type(exc).__name__, "failures": sorted(exc.failures), "phase": exc.phase}
        after = comm.all_gather(ctx.rank * 3, "after")
        return {"small": small, "mixed": [(len(s), s[-1]) for s in mixed], "none": nothing,
                "told": told[-1], "failed": failed, "after": after}
    finally:
        wire.SLOTTED_WORLD_BYTES = saved


def one_rank_stays_away(ctx: Any, missing: int) -> dict[str, Any]:
    """Every rank all-gathers once; then ``missing`` does not come to the second one."""
    from distckpt import CheckpointError, wire
    from distckpt.collectives import TorchComm

    saved = wire.SLOTTED_WORLD_BYTES
    wire.SLOTTED_WORLD_BYTES = 0
    try:
        comm = TorchComm(TIMEOUT_S)
        comm.all_gather(ctx.rank, "first")
        if ctx.rank == missing:
            time.sleep(TIMEOUT_S + 2.0)
            return {"rank": ctx.rank, "stayed_away": True}
        started = time.monotonic()
        try:
            comm.all_gather(ctx.rank, "second")
        except CheckpointError as exc:
            return {"rank": ctx.rank, "raised": type(exc).__name__, "failures": exc.failures, "phase": exc.phase,
                    "elapsed": time.monotonic() - started}
        return {"rank": ctx.rank, "raised": None}
    finally:
        wire.SLOTTED_WORLD_BYTES = saved


@pytest.mark.timeout(120)
def test_sized_rounds_on_gloo_deliver_every_payload_and_carry_one_ranks_error_to_all(
        world_pool: WorldPool, tmp_path: Path) -> None:
    results = world_pool.run_ok(WorldSpec(nodes=1, procs_per_node=4, workdir=tmp_path), sized_collectives, timeout=90)
    for r in results:
        assert r["small"] == [{"rank": k} for k in range(4)]
        assert r["mixed"] == [(11, "0"), (100_001, "1"), (11, "2"), (11, "3")]
        assert r["none"] == [None] * 4 and r["told"] == 1999
        assert r["failed"] == {"raised": "CrossRankError", "failures": [1], "phase": "plan"}
        assert r["after"] == [0, 3, 6, 9]


@pytest.mark.timeout(120)
def test_a_rank_missing_from_a_sized_all_gather_is_named_by_every_other_rank_within_the_timeout(
        world_pool: WorldPool, tmp_path: Path) -> None:
    results = world_pool.run_ok(WorldSpec(nodes=1, procs_per_node=3, workdir=tmp_path), one_rank_stays_away, 2,
                                timeout=90)
    survivors = [r for r in results if r["rank"] != 2]
    for r in survivors:
        assert r["raised"] == "CollectiveTimeoutError" and r["phase"] == "second", r
        assert set(r["failures"]) == {2} and "did not reach the 'second' step" in r["failures"][2], r
        assert r["elapsed"] <= TIMEOUT_S + 15.0, r
