"""``pp`` and ``dp_pp``: pipeline parallelism over point-to-point sends (GPipe schedule).

Each rank holds one stage. Every stage of a pipeline steps the pipeline's data
loader (so all stages hold the same data position, as the guide's DP x PP
declaration says); the first stage feeds the inputs, the last takes the targets,
and micro-batch activations stream forward; gradients flow back the same way.
``dp_pp`` runs ``dp`` such pipelines on different data and averages every
stage's gradients across its ``dp`` group.
Ranks are laid out row-major over (dp, pp): a pipeline is contiguous ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.models import pipeline_stage
from harness.trainers.base import Trainer

__all__ = ["DPPipelineTrainer", "PipelineTrainer"]


class PipelineTrainer(Trainer):
    """One pipeline over the whole world: stage = rank."""

    name = "pp"

    def layout(self) -> tuple[int, int]:
        """(replica index, pipeline size)."""
        return 0, self.world_size

    def build(self) -> None:
        self.replica, self.stages = self.layout()
        self.stage = self.rank % self.stages
        self.first_rank = self.replica * self.stages
        self.last_rank = self.first_rank + self.stages - 1
        self.microbatches = int(self.scenario.options.get("microbatches", 2))
        batch = self.scenario.run.batch_size
        if batch % self.microbatches:
            raise ValueError(
                f"{self.scenario.path}: run.batch_size {batch} does not split into "
                f"{self.microbatches} micro-batches"
            )
        self.model = pipeline_stage(self.stage, self.stages, self.hidden, self.dropout).to(
            self.device
        )
        # One loader per pipeline, stepped by every stage (docs/guide.md, DP x PP): all stages
        # of a pipeline hold the same position, so PER_GROUP("pp") validates and any stage resumes it.
        self.loader = self.dataset(shard=self.replica, batch_size=batch)
        self.pipeline_group: Any = None
        self.build_groups()

    def build_groups(self) -> None:
        """Hook for ``dp_pp``: the groups of the mesh."""

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def forward_backward(self) -> float:
        mb = self.scenario.run.batch_size // self.microbatches
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        x, y = self.to_device(*self.loader.next_batch())  # every stage: same batch, same position
        if self.is_first:
            xs = list(x.chunk(self.microbatches))
        if self.is_last:
            ys = list(y.chunk(self.microbatches))
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        for i in range(self.microbatches):
            if self.is_first:
                inp = xs[i]
            else:
                fan_in = self._fan_in()
                inp = torch.empty(mb, fan_in, device=self.device)
                dist.recv(inp, src=self.rank - 1)
                inp.requires_grad_(True)
            out = self.model(inp)
            if not self.is_last:
                dist.send(out.detach().contiguous(), dst=self.rank + 1)
            inputs.append(inp)
            outputs.append(out)
        total = torch.zeros((), device=self.device)
        for i in reversed(range(self.microbatches)):
            if self.is_last:
                loss = nn.functional.mse_loss(outputs[i], ys[i]) / self.microbatches
                loss.backward()  # type: ignore[no-untyped-call]
                total += loss.detach()
            else:
                grad = torch.empty_like(outputs[i])
                dist.recv(grad, src=self.rank + 1)
                outputs[i].backward(grad)  # type: ignore[no-untyped-call]
            if not self.is_first:
                grad_in = inputs[i].grad
                assert grad_in is not None
                dist.send(grad_in.contiguous(), dst=self.rank - 1)
        self.sync_gradients()
        dist.broadcast(total, src=self.last_rank, group=self.pipeline_group)
        return float(total.item())

    def _fan_in(self) -> int:
        first = next(iter(self.model.parameters()))
        return int(first.shape[1])

    def sync_gradients(self) -> None:
        """Hook for ``dp_pp``: average gradients across pipeline replicas."""


class DPPipelineTrainer(PipelineTrainer):
    """``dp`` pipelines of ``pp`` stages; stage gradients averaged over the ``dp`` group."""

    name = "dp_pp"

    def layout(self) -> tuple[int, int]:
        sizes = self.topology.mesh_sizes
        return self.rank // sizes["pp"], sizes["pp"]

    def build_groups(self) -> None:
        sizes = self.topology.mesh_sizes
        dp, pp = sizes["dp"], sizes["pp"]
        self.groups: dict[str, Any] = {}
        for d in range(dp):  # pipelines: contiguous ranks
            members = list(range(d * pp, (d + 1) * pp))
            group = dist.new_group(members)
            if self.rank in members:
                self.groups["pp"] = group
        for s in range(pp):  # one stage across replicas
            members = [d * pp + s for d in range(dp)]
            group = dist.new_group(members)
            if self.rank in members:
                self.groups["dp"] = group
        self.pipeline_group = self.groups["pp"]
        self.dp_size = dp

    def process_groups(self) -> Any:
        return self.groups

    def sync_gradients(self) -> None:
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.groups["dp"])
                p.grad /= self.dp_size
