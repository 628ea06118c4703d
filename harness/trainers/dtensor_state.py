"""Shared by the trainers on torch's own parallel APIs (``tp``, ``fsdp``, ``hsdp``, ``dp_pp_tp``).

Their model and optimizer components go through
``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict`` /
``get_optimizer_state_dict``), as a trainer author using FSDP2 or DTensor tensor
parallelism would write them: the states hold DTensors, and the optimizer's
state is initialised (zero-gradient, zero-lr step) before a load so that every
DTensor entry has a live DTensor to be restored into.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.trainers.base import Trainer

__all__ = ["MeshTrainer", "ModelState", "OptimizerState", "average_gradients", "local"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), sharing its memory."""
    to_local = getattr(t, "to_local", None)
    if to_local is None:
        return t
    with torch.no_grad():
        out: torch.Tensor = to_local()
    return out


class ModelState:
    """A model as a distckpt stateful, through DCP's ``get/set_model_state_dict``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerState:
    """An optimizer as a distckpt stateful, through DCP's ``get/set_optimizer_state_dict``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


class MeshTrainer(Trainer):
    """A trainer whose ``build`` sets ``self.mesh`` (a ``DeviceMesh``, handed to the coordinator as
    its process groups) and whose model and optimizer go through DCP's state-dict functions."""

    mesh: Any

    def process_groups(self) -> Any:
        return self.mesh

    def components(self) -> dict[str, Any]:
        return {**super().components(), "model": ModelState(self.model),
                "optimizer": OptimizerState(self.model, self.optimizer)}


def average_gradients(model: nn.Module, group: Any, size: int) -> None:
    """Average every gradient's local shard over ``group`` (data parallel replicas)."""
    if size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            g = local(p.grad)
            dist.all_reduce(g, group=group)
            g /= size
