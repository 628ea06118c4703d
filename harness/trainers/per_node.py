"""``per_node``: DDP across nodes plus a node-local cache (PER_NODE).

The node of a rank comes from the launcher's environment (``GROUP_RANK``, as
torchrun sets it), gathered once, exactly as a trainer on a real cluster would.
The cache is a running mean of the inputs seen by the node's ranks (an
all-reduce within the node's group); inputs are centred with it, so the resumed
run is bit-exact only if every node gets its own cache back.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from harness.models import IN_DIM
from harness.trainers.ddp import DDPTrainer

__all__ = ["NodeCache", "PerNodeTrainer"]


class NodeCache:
    """A running mean of the node's inputs (identical within a node, different across nodes)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.mean = torch.zeros(dim, device=device)
        self.count = 0

    def update(self, batch_mean: torch.Tensor) -> None:
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean.copy_(state["mean"])
        self.count = int(state["count"])


class PerNodeTrainer(DDPTrainer):
    """Independent shards per rank, a DDP model, and a per-node input cache."""

    name = "per_node"
    dispatch = False

    def build(self) -> None:
        super().build()
        node = int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))
        nodes: list[Any] = [None] * self.world_size
        dist.all_gather_object(nodes, node)
        self.node_group: Any = None
        self.node_size = 0
        for n in sorted(set(nodes)):
            members = [r for r, m in enumerate(nodes) if m == n]
            group = dist.new_group(members)
            if n == node:
                self.node_group, self.node_size = group, len(members)
        self.cache = NodeCache(IN_DIM, self.device)

    def components(self) -> dict[str, Any]:
        return {**super().components(), "cache": self.cache}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        total = x.sum(dim=0)
        dist.all_reduce(total, group=self.node_group)
        self.cache.update(total / (x.shape[0] * self.node_size))
        return x - self.cache.mean
