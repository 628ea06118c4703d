"""The mini trainers, one per parallel layout, by scenario trainer name."""

from __future__ import annotations

from harness.trainers.base import Trainer
from harness.trainers.ddp import DDPTrainer, IndependentDDPTrainer
from harness.trainers.dp_pp_tp import DPPipelineTPTrainer
from harness.trainers.dp_tp import TensorParallelTrainer
from harness.trainers.fsdp import FSDPTrainer
from harness.trainers.hsdp import HSDPTrainer
from harness.trainers.per_node import PerNodeTrainer
from harness.trainers.pp import DPPipelineTrainer, PipelineTrainer
from harness.trainers.single import SingleTrainer
from harness.trainers.tp import DTensorTPTrainer

__all__ = ["TRAINER_CLASSES", "Trainer", "trainer_class"]

TRAINER_CLASSES: dict[str, type[Trainer]] = {
    cls.name: cls
    for cls in (
        SingleTrainer,
        DDPTrainer,
        IndependentDDPTrainer,
        PipelineTrainer,
        DPPipelineTrainer,
        TensorParallelTrainer,
        PerNodeTrainer,
        DTensorTPTrainer,
        FSDPTrainer,
        HSDPTrainer,
        DPPipelineTPTrainer,
    )
}


def trainer_class(name: str) -> type[Trainer]:
    """The trainer class for a scenario's ``trainer`` name."""
    try:
        return TRAINER_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown trainer {name!r}; known: {sorted(TRAINER_CLASSES)}") from None
