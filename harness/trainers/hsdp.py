"""``hsdp``: FSDP2 ``fully_shard`` over a 2-D mesh ("dp", "shard"): replicated over ``dp``, sharded over ``shard``.

Ranks with the same ``shard`` coordinate hold the same parameter and AdamW
shards, so model and optimizer are ``PER_GROUP("dp")``; each rank reads its own
data shard (dataset ``PER_RANK``). FSDP2 averages gradients itself
(reduce-scatter within a replica, all-reduce across replicas).
"""

from __future__ import annotations

from harness.trainers.fsdp import FSDPTrainer

__all__ = ["HSDPTrainer"]


class HSDPTrainer(FSDPTrainer):
    """HSDP: replicated over ``dp``, sharded over ``shard``."""

    name = "hsdp"
    mesh_dims = ("dp", "shard")
