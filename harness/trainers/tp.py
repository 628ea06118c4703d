"""``tp``: data parallel x DTensor tensor parallel on a ``DeviceMesh`` named ("dp", "tp").

The MLP's first linear is ``ColwiseParallel`` and its second ``RowwiseParallel``
(``parallelize_module`` over the mesh's ``tp`` dimension); the head stays a
plain, replicated linear. Model and optimizer states hold DTensors, identical
along ``dp``: ``PER_GROUP("dp")``. Every TP rank of a replica reads the same
batch from its own copy of the replica's loader: dataset ``PER_GROUP("tp")``.
Gradients' local shards are averaged over ``dp``.
"""

from __future__ import annotations

from torch import nn

from harness.models import mlp
from harness.trainers.dtensor_state import MeshTrainer, average_gradients

__all__ = ["DTensorTPTrainer"]


class DTensorTPTrainer(MeshTrainer):
    """DP x TP with ``torch.distributed.tensor.parallel``; the mesh goes to the coordinator."""

    name = "tp"

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        sizes = self.topology.mesh_sizes
        self.mesh = init_device_mesh(self.device.type, (sizes["dp"], sizes["tp"]), mesh_dim_names=("dp", "tp"))
        self.dp_size = sizes["dp"]
        model = mlp(self.hidden, self.dropout).to(self.device)
        # Linear -> GELU -> Dropout -> Linear -> GELU -> Linear: 0 column-, 3 row-parallel, 5 replicated
        self.model = parallelize_module(model, self.mesh["tp"], {"0": ColwiseParallel(), "3": RowwiseParallel()})
        self.loader = self.dataset(shard=self.mesh.get_local_rank("dp"), batch_size=self.scenario.run.batch_size)

    def forward_backward(self) -> float:
        x, y = self.to_device(*self.loader.next_batch())
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        average_gradients(self.model, self.mesh.get_group("dp"), self.dp_size)
        return float(loss.item())
