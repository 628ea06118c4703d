"""``dp_tp``: data parallel x tensor parallel on a ``DeviceMesh`` named ("dp", "tp").

The model is a Megatron-style MLP block (column-parallel then row-parallel
linear, with the all-reduce in between); its shards are identical along ``dp``
and different along ``tp``. Every TP rank of a replica reads the same batch
from its own copy of the replica's loader, so the loader is identical along
``tp``. Gradients are averaged over the ``dp`` group.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from harness.models import TensorParallelMLP
from harness.trainers.base import Trainer

__all__ = ["TensorParallelTrainer"]


class TensorParallelTrainer(Trainer):
    """DP x TP with a DeviceMesh passed to the coordinator as ``process_groups``."""

    name = "dp_tp"

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        sizes = self.topology.mesh_sizes
        self.mesh = init_device_mesh(
            self.device.type, (sizes["dp"], sizes["tp"]), mesh_dim_names=("dp", "tp")
        )
        self.dp_group = self.mesh.get_group("dp")
        tp_group = self.mesh.get_group("tp")
        self.dp_size = sizes["dp"]
        dp_rank = self.mesh.get_local_rank("dp")
        tp_rank = self.mesh.get_local_rank("tp")
        self.model = TensorParallelMLP(
            self.hidden, self.dropout, tp_rank, sizes["tp"], tp_group
        ).to(self.device)
        self.loader = self.dataset(shard=dp_rank, batch_size=self.scenario.run.batch_size)

    def process_groups(self) -> Any:
        return self.mesh

    def forward_backward(self) -> float:
        x, y = self.to_device(*self.loader.next_batch())
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad /= self.dp_size
        return float(loss.item())
