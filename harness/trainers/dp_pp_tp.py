"""``dp_pp_tp``: data x pipeline x DTensor tensor parallel on a 3-D mesh ("dp", "pp", "tp").

Ranks are row-major over the mesh (``tp`` fastest). A pipeline is the ``pp``
ranks of one ``dp`` replica and one ``tp`` coordinate; every stage is a
``ColwiseParallel`` / ``RowwiseParallel`` block over the mesh's ``tp``
dimension, whose output is replicated along ``tp``, so the tp rank ``t`` of
stage ``s`` sends its activations to the tp rank ``t`` of stage ``s + 1`` (and
gradients come back the same way). Each stage's model and optimizer shards are
identical along ``dp``: ``PER_GROUP("dp")``. Every rank of a replica reads the
same batch from its own copy of the replica's loader (stage 0 uses the inputs,
the last stage the targets), so the loader is identical along ``pp`` and
``tp``: ``group = ["pp", "tp"]``, the join of both partitions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from harness.models import IN_DIM, OUT_DIM
from harness.trainers.dtensor_state import MeshTrainer, average_gradients

__all__ = ["DPPipelineTPTrainer"]


def _stage(stage: int, stages: int, hidden: int, dropout: float, seed: int) -> nn.Sequential:
    """Stage ``stage``: ``Linear -> GELU -> Dropout -> Linear`` (the last one ends on the head),
    initialised from a generator of its own, whichever rank builds it."""
    fan_in = IN_DIM if stage == 0 else hidden
    fan_out = OUT_DIM if stage == stages - 1 else hidden
    module = nn.Sequential(nn.Linear(fan_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, fan_out))
    g = torch.Generator().manual_seed(seed * 31 + stage)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


class DPPipelineTPTrainer(MeshTrainer):
    """One TP-parallel pipeline stage per rank; the 3-D mesh goes to the coordinator."""

    name = "dp_pp_tp"

    def build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        sizes = self.topology.mesh_sizes
        self.dp_size, self.stages, tp = sizes["dp"], sizes["pp"], sizes["tp"]
        self.mesh = init_device_mesh(self.device.type, (self.dp_size, self.stages, tp),
                                     mesh_dim_names=("dp", "pp", "tp"))
        self.stage = self.mesh.get_local_rank("pp")
        module = _stage(self.stage, self.stages, self.hidden, self.dropout, self.seed).to(self.device)
        self.model = parallelize_module(module, self.mesh["tp"], {"0": ColwiseParallel(), "3": RowwiseParallel()})
        self.loader = self.dataset(shard=self.mesh.get_local_rank("dp"), batch_size=self.scenario.run.batch_size)
        self.previous = self.rank - tp  # the same tp coordinate one stage back / forward
        self.next = self.rank + tp

    def forward_backward(self) -> float:
        x, y = self.to_device(*self.loader.next_batch())  # every rank of a replica draws the batch
        first, last = self.stage == 0, self.stage == self.stages - 1
        if first:
            inp = x
        else:
            inp = torch.empty(x.shape[0], self.hidden, device=self.device)
            dist.recv(inp, src=self.previous)
            inp.requires_grad_(True)
        out = self.model(inp)
        total = torch.zeros((), device=self.device)
        if last:
            loss = nn.functional.mse_loss(out, y)
            loss.backward()  # type: ignore[no-untyped-call]
            total += loss.detach()
        else:
            dist.send(out.detach().contiguous(), dst=self.next)
            grad = torch.empty_like(out)
            dist.recv(grad, src=self.next)
            out.backward(grad)
        if not first:
            assert inp.grad is not None
            dist.send(inp.grad.contiguous(), dst=self.previous)
        average_gradients(self.model, self.mesh.get_group("dp"), self.dp_size)
        pp_group = self.mesh.get_group("pp")
        dist.broadcast(total, src=dist.get_global_rank(pp_group, self.stages - 1), group=pp_group)
        return float(total.item())
