"""A checkpoint with fixed content, for the on-disk format stability test.

``write(out)`` saves it with whatever distckpt is importable: four threaded
ranks on two nodes, every built-in pattern, a balanced write (parts), a
validated component, nested non-tensor values, several dtypes and component
metadata. The committed fixture ``tests/data/format-481fced/`` was written by
this module running on main at commit 481fced, before issue 13 moved the code
around::

    git archive 481fced src | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old/src:. python -m tests.format_golden tests/data/format-481fced

:mod:`tests.unit.test_format_stability` writes it again with the current code
and compares: every file byte for byte, the manifest byte for byte except its
volatile fields (:data:`VOLATILE`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from distckpt import CheckpointCoordinator, SharingPattern, StateComponent, ValidationLevel
from distckpt.patterns import PerGroup
from distckpt.testing import ThreadComm, ThreadWorld, run_threads
from tests.helpers import Box

CHECKPOINT_ID = "golden"
WORLD_SIZE = 4
NODES = (0, 0, 1, 1)
#: Manifest fields that differ between two identical saves (or two environments).
VOLATILE = ("timestamp", "pytorch_version", "library_version")


def _ramp(n: int, dtype: torch.dtype, start: float) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float64) * 0.25 + start).to(dtype)


def states(rank: int) -> dict[str, Any]:
    """Each component's state on ``rank`` (replicas hold equal state, as they must)."""
    node = NODES[rank]
    dp_index = rank % 2  # groups "dp": {0, 2} and {1, 3}
    return {
        "model": {
            "layer.weight": _ramp(96, torch.float32, 1.0).reshape(8, 12),
            "layer.bias": _ramp(12, torch.bfloat16, -2.0),
            "embed": _ramp(64, torch.float16, 0.5).reshape(16, 4),
        },
        "optimizer": {
            "step": 7,
            "lr": 0.001,
            "betas": [0.9, 0.999],
            "state": {"0": {"exp_avg": _ramp(10, torch.float32, 0.125)}},
        },
        "rng": {"seed": 1234 + rank, "generator": torch.arange(rank, rank + 8, dtype=torch.uint8)},
        "dataloader": {"epoch": 3, "offset": 100 * rank, "names": ["a", "b"], "done": False, "none": None},
        "cache": {"node": node, "table": torch.full((4,), float(node), dtype=torch.float64)},
        "shard": {"index": dp_index, "rows": _ramp(6, torch.int64, float(10 * dp_index))},
        "counters": {"tokens": torch.tensor([1, 2, 3], dtype=torch.int32), "loss": 2.5},
    }


def _components(rank: int) -> list[StateComponent]:
    s = states(rank)
    return [
        StateComponent("model", Box(s["model"]), SharingPattern.REPLICATED, validate_replication=True,
                       validation_level=ValidationLevel.FULL, metadata={"arch": "tiny", "layers": 1}),
        StateComponent("optimizer", Box(s["optimizer"]), SharingPattern.REPLICATED),
        StateComponent("rng", Box(s["rng"]), SharingPattern.PER_RANK),
        StateComponent("dataloader", Box(s["dataloader"]), SharingPattern.PER_RANK, required=False),
        StateComponent("cache", Box(s["cache"]), SharingPattern.PER_NODE),
        StateComponent("shard", Box(s["shard"]), PerGroup("dp")),
        StateComponent("counters", Box(s["counters"]), SharingPattern.GLOBAL),
    ]


def write(out: str) -> str:
    """Save the fixed checkpoint under ``out``; returns its path (``<out>/checkpoints/checkpoint-golden``)."""
    world = ThreadWorld(WORLD_SIZE, nodes=list(NODES), timeout=60.0)

    def rank_main(comm: ThreadComm) -> str:
        dp = (comm.rank % 2, comm.rank % 2 + 2)
        coordinator = CheckpointCoordinator(
            _components(comm.rank), process_groups={"dp": dp}, dist=comm, output_dir=out,
            min_part_bytes=128,  # the replicated model is written as parts by several ranks
        )
        return coordinator.save_checkpoint(checkpoint_id=CHECKPOINT_ID, validate=True)

    results = run_threads(world, rank_main)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return str(results[0])


if __name__ == "__main__":
    target = os.path.abspath(sys.argv[1])
    path = write(os.path.join(target, "work"))
    os.replace(path, os.path.join(target, "checkpoint"))
    os.rmdir(os.path.join(target, "work", "checkpoints"))
    os.rmdir(os.path.join(target, "work"))
    print(os.path.join(target, "checkpoint"))
