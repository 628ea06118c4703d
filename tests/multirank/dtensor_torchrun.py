"""The DTensor checks under a real launcher, on whatever backend it is given.

    torchrun --standalone --nproc-per-node=4 -m tests.multirank.dtensor_torchrun --backend nccl --workdir DIR

With NCCL each rank takes the GPU of its ``LOCAL_RANK`` and every mesh is a
CUDA mesh (local shards on the GPU are copied to and from host memory by the
codec); with gloo the same checks run on CPU meshes. Needs 4 ranks. Exits 0
when every check passed on this rank, 1 otherwise, printing one line per check.
Used by ``.github/workflows/gpu.yml``; rehearsed with ``--backend gloo``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from distckpt import CheckpointError, LayoutMismatchError, ReplicationMismatchError
from tests.multirank import dtensor_ranks


def _checks() -> list[tuple[str, Callable[[Any], str | None]]]:
    """(name, check): a check returns ``None`` when it passed, else what went wrong."""
    def round_trip(dcp_api: bool, options: dict[str, Any]) -> Callable[[Any], str | None]:
        def check(ctx: Any) -> str | None:
            r = dtensor_ranks.fsdp2_round_trip(ctx, dcp_api, options)
            ok = r["exact"] and r["differed_before"] and r["exp_avg_type"] == "DTensor"
            return None if ok else f"not bit-exact: {r}"
        return check

    def raises(kind: type[CheckpointError], run: Callable[[Any], Any]) -> Callable[[Any], str | None]:
        def check(ctx: Any) -> str | None:
            try:
                run(ctx)
            except kind as exc:  # raised on every rank, naming the failing ranks
                return None if exc.failures else f"{exc!r} names no failing rank"
            return f"expected {kind.__name__}"
        return check

    def tp(ctx: Any) -> str | None:
        r = dtensor_ranks.tp_round_trip(ctx)
        return None if r["exact"] and r["writers"] == [0, 1] else f"tp: {r}"

    return [
        ("fsdp2-dcp-api", round_trip(True, {})),
        ("fsdp2-plain-state-dict", round_trip(False, {})),
        ("fsdp2-not-in-place", round_trip(True, {"load_in_place": False})),
        ("fsdp2-read-and-broadcast", round_trip(True, {"load_strategy": "read_and_broadcast"})),
        ("tp-per-group-dp", tp),
        ("fsdp2-into-hsdp", raises(LayoutMismatchError, dtensor_ranks.fsdp2_into_hsdp)),
        ("misdeclared-fsdp2", raises(ReplicationMismatchError,
                                     lambda ctx: dtensor_ranks.misdeclared(ctx, (4,), ("dp",), "dp"))),
        ("misdeclared-hsdp", raises(ReplicationMismatchError,
                                    lambda ctx: dtensor_ranks.misdeclared(ctx, (2, 2), ("dp", "shard"), "shard"))),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="nccl")
    parser.add_argument("--workdir", required=True, help="a directory every rank can reach")
    args = parser.parse_args(argv)
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=args.backend, timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    failed = 0
    try:
        if dist.get_world_size() != 4:
            raise SystemExit(f"dtensor_torchrun needs 4 ranks, got {dist.get_world_size()}")
        for name, check in _checks():
            folder = os.path.join(args.workdir, name)
            if rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
                os.makedirs(folder)
            dist.barrier()
            try:
                problem = check(SimpleNamespace(rank=rank, workdir=folder))
            except Exception:  # a check that crashed: report it, keep the ranks in step
                problem = traceback.format_exc()
            print(f"rank {rank} [{args.backend}] {name}: {'ok' if problem is None else 'FAILED ' + problem}", flush=True)
            failed += problem is not None
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
