"""One rank of a trainer that saves asynchronously and exits without waiting (issue 11, item 10).

Run as ``python -m tests.faults.async_exit_main RANK WORLD STORE_FILE OUT MODE`` by
tests/faults/test_async_exit_faults.py, one process per rank, like a script under
torchrun: torch.distributed on gloo, a save_checkpoint(async_save=True), then

* ``plain``: a normal exit;
* ``destroy``: destroy_process_group(), then a normal exit;
* ``fail``: the background write fails on rank 1 (nobody calls wait()), then
  destroy_process_group() and a normal exit.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from distckpt import CheckpointCoordinator, SharingPattern, StateComponent
from tests.helpers import Box


def main(rank: int, world: int, store_file: str, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))

    def hook(phase: str, at: int) -> None:
        if mode == "fail" and phase == "write" and at == 1:
            raise OSError("injected: the disk went away during the background write")

    components = [
        StateComponent("model", Box({"w": torch.full((1 << 21,), float(rank))}), SharingPattern.PER_RANK),
        StateComponent("trainer", Box({"step": 7, "w": torch.arange(1 << 20)}), SharingPattern.REPLICATED),
    ]
    coordinator = CheckpointCoordinator(components, output_dir=out, timeout=30, phase_hook=hook,
                                        min_part_bytes=None)
    coordinator.save_checkpoint(checkpoint_id="at-exit", async_save=True)
    if mode in ("destroy", "fail"):
        dist.destroy_process_group()
    print(f"rank {rank}: main is done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
