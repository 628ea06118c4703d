"""A complete data-parallel trainer that saves and resumes with distckpt.

Run it (twice: the second launch resumes where the first one's last checkpoint left off):

    torchrun --standalone --nproc-per-node 2 examples/trainer/train.py --out runs/demo --steps 8
    torchrun --standalone --nproc-per-node 2 examples/trainer/train.py --out runs/demo --steps 12

Every rank trains the same model (DDP over gloo; use "nccl" and move the model to
its GPU on a GPU machine) on its own shard of a synthetic dataset. ``--trace DIR``
appends one line per step to ``DIR/rank-<rank>.txt``, "<step> <digest of this rank's
state>", so that two runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distckpt import CheckpointCoordinator, RNGState, StateComponent


class ShardLoader:
    """Batches from this rank's shard, in a fresh order each epoch: a Stateful data loader."""

    def __init__(self, rank: int, batch_size: int = 16, samples: int = 256) -> None:
        g = torch.Generator().manual_seed(1000 + rank)  # the shard: different data on every rank
        self.x = torch.randn(samples, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True).sin()
        self.rank, self.batch_size = rank, batch_size
        self.epoch, self.position = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if (self.position + 1) * self.batch_size > len(self.x):
            self.epoch, self.position = self.epoch + 1, 0
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        index = order[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        return self.x[index], self.y[index]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


class Counter:
    """The trainer's own bookkeeping: the number of the last finished step."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]


def digest(*states: Any) -> str:
    """A digest of every tensor and number in ``states`` (to compare runs bit for bit)."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            h.update(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                h.update(str(key).encode())
                visit(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    for state in states:
        visit(state)
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="checkpoints go to OUT/checkpoints/")
    parser.add_argument("--steps", type=int, default=8, help="train until this step")
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--stop-after", type=int, default=None, help="exit after this step, unsaved (a crash)")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in the background")
    parser.add_argument("--background-staging", action="store_true",
                        help="also copy the state in the background, behind the next forward and backward")
    parser.add_argument("--trace", default=None, help="append '<step> <state digest>' lines to TRACE/rank-<r>.txt")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    loader, counter, rng = ShardLoader(rank), Counter(), RNGState()
    torch.manual_seed(100 + rank)  # each rank its own random stream (dropout)

    coordinator = CheckpointCoordinator(
        [
            StateComponent("model", model, "replicated", validate_replication=True),
            StateComponent("optimizer", optimizer, "replicated", validate_replication=True),
            StateComponent("scheduler", scheduler, "replicated"),
            StateComponent("counter", counter, "replicated"),
            StateComponent("data", loader, "per_rank"),
            StateComponent("rng", rng, "per_rank"),
        ],
        output_dir=args.out,
        keep_last=2,
    )

    def trace(label: str) -> None:
        if args.trace:
            state = digest(model.state_dict(), optimizer.state_dict(), scheduler.state_dict(),
                           loader.state_dict(), rng.state_dict(), counter.step)
            os.makedirs(args.trace, exist_ok=True)
            with open(os.path.join(args.trace, f"rank-{rank}.txt"), "a") as f:
                f.write(f"{label} {state}\n")

    report = coordinator.load_checkpoint(missing_ok=True)  # every rank; nothing to load on the first launch
    if report.loaded:
        trace(f"resumed-{counter.step}")
        if rank == 0:
            print(f"resumed from {report.path} at step {counter.step}", flush=True)

    staging = None  # a save whose copy is still being taken in the background
    while counter.step < args.steps:
        x, y = loader.next_batch()
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if staging is not None:
            staging.wait_staged()  # the step below changes the saved tensors: the copy must be done
            staging = None
        optimizer.step()
        scheduler.step()
        counter.step += 1
        trace(str(counter.step))
        if counter.step % args.save_every == 0:
            if args.background_staging:
                staging = coordinator.save_checkpoint(checkpoint_id=counter.step, async_save=True,
                                                      background_staging=True)
            else:
                coordinator.save_checkpoint(checkpoint_id=counter.step, async_save=args.async_save)
        if counter.step == args.stop_after:
            os._exit(0)  # a crash: whatever was not saved is lost
    coordinator.wait()  # an asynchronous save still writing finishes (or raises) here
    if rank == 0:
        print(f"finished step {counter.step}, loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
