"""``ddp`` and ``ddp_independent``: DistributedDataParallel over the whole world.

``ddp`` dispatches: rank 0 draws each global batch from the one loader and
scatters a slice to every rank (dataset GLOBAL). ``ddp_independent`` lets every
rank iterate its own data shard (dataset PER_RANK).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.models import IN_DIM, OUT_DIM, mlp
from harness.trainers.base import Trainer

__all__ = ["DDPTrainer", "IndependentDDPTrainer"]


class DDPTrainer(Trainer):
    """DDP with dispatched batches: the global batch is split evenly across ranks."""

    name = "ddp"
    dispatch = True

    def build(self) -> None:
        self.model = mlp(self.hidden, self.dropout).to(self.device)
        self.ddp = _wrap(self.model, self.device)
        batch = self.scenario.run.batch_size
        if self.dispatch:
            if batch % self.world_size:
                raise ValueError(
                    f"{self.scenario.path}: run.batch_size {batch} does not split "
                    f"evenly over {self.world_size} ranks"
                )
            self.local_batch = batch // self.world_size
            self.loader = self.dataset(shard=0, batch_size=batch)
            self.data_owner = self.rank == 0
        else:
            self.local_batch = batch
            self.loader = self.dataset(shard=self.rank, batch_size=batch)

    def next_local_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's inputs and targets for the step."""
        if not self.dispatch:
            x, y = self.to_device(*self.loader.next_batch())
            return x, y
        x = torch.empty(self.local_batch, IN_DIM, device=self.device)
        y = torch.empty(self.local_batch, OUT_DIM, device=self.device)
        if self.rank == 0:
            gx, gy = self.to_device(*self.loader.next_batch())
            dist.scatter(x, list(gx.chunk(self.world_size)), src=0)
            dist.scatter(y, list(gy.chunk(self.world_size)), src=0)
        else:
            dist.scatter(x, None, src=0)
            dist.scatter(y, None, src=0)
        return x, y

    def forward_backward(self) -> float:
        x, y = self.next_local_batch()
        loss = nn.functional.mse_loss(self.ddp(self.prepare(x)), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.item())

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses to transform inputs before the model."""
        return x


class IndependentDDPTrainer(DDPTrainer):
    """DDP where every rank reads its own shard (``dispatch_batches=False``)."""

    name = "ddp_independent"
    dispatch = False


def _wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP with one gradient bucket per parameter.

    DDP rebuilds its buckets after the first iteration in gradient-ready order,
    so an uninterrupted run and a resumed one would all-reduce differently laid
    out buckets at the resume step, and a ring all-reduce over 3+ ranks sums an
    element in an order that depends on its offset in the bucket: the runs would
    differ in the last bits. With one parameter per bucket the layout, hence
    every sum, is the same in both. Torch releases without ``bucket_cap_mb_list``
    get the same effect from ``find_unused_parameters=True``, under which DDP
    never rebuilds its buckets.
    """
    ids = [device.index] if device.type == "cuda" else None
    if "bucket_cap_mb_list" in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallel(model, device_ids=ids, bucket_cap_mb_list=[0])
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
