"""``fsdp``: FSDP2 ``fully_shard`` on a 1-D ``dp`` mesh (``hsdp`` reuses it on a 2-D mesh).

Every parameter (and AdamW moment) is a DTensor sharded over the
whole world, so model and optimizer differ on every rank: ``PER_RANK``; each
rank reads its own data shard (dataset ``PER_RANK``).
FSDP2 averages gradients itself (reduce-scatter).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from harness.models import mlp
from harness.trainers.dtensor_state import MeshTrainer

__all__ = ["FSDPTrainer"]


class FSDPTrainer(MeshTrainer):
    """FSDP2 over the mesh named by ``mesh_dims``; the mesh goes to the coordinator."""

    name = "fsdp"
    mesh_dims: ClassVar[tuple[str, ...]] = ("dp",)

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard  # type: ignore[attr-defined]

        sizes = self.topology.mesh_sizes
        self.mesh = init_device_mesh(self.device.type, tuple(sizes[d] for d in self.mesh_dims),
                                     mesh_dim_names=self.mesh_dims)
        self.model = mlp(self.hidden, self.dropout).to(self.device)
        for layer in self.model.children():
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=self.mesh)
        fully_shard(self.model, mesh=self.mesh)
        self.loader = self.dataset(shard=self.rank, batch_size=self.scenario.run.batch_size)

    def forward_backward(self) -> float:
        x, y = self.to_device(*self.loader.next_batch())
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.item())

