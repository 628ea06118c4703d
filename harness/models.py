"""Tiny models for the mini trainers: an MLP, pipeline stages and tensor-parallel layers.

Every model has dropout, so the random generators' state matters to a resumed
run. Tensor-parallel layers are built by slicing a dense layer initialised from
one seed, so a DP x TP model is the dense model cut into shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "TensorParallelMLP",
    "mlp",
    "pipeline_stage",
]

IN_DIM = 8
OUT_DIM = 4


def mlp(hidden: int, dropout: float) -> nn.Module:
    """``Linear -> GELU -> Dropout -> Linear -> GELU -> Linear`` on ``IN_DIM`` -> ``OUT_DIM``."""
    return nn.Sequential(
        nn.Linear(IN_DIM, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, OUT_DIM),
    )


def pipeline_stage(stage: int, stages: int, hidden: int, dropout: float) -> nn.Module:
    """Stage ``stage`` of ``stages``: ``Linear -> GELU -> Dropout``, the last stage a plain head.

    Every stage is initialised from the same generator stream regardless of the
    rank that builds it, as if one model were built and then cut.
    """
    g = torch.Generator().manual_seed(10_000 + stage)
    fan_in = IN_DIM if stage == 0 else hidden
    if stage == stages - 1:
        module: nn.Module = nn.Linear(fan_in, OUT_DIM)
    else:
        module = nn.Sequential(nn.Linear(fan_in, hidden), nn.GELU(), nn.Dropout(dropout))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce (sum) over the TP group forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the input gradient over the TP group backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ColumnParallelLinear(nn.Module):
    """Output features split across the TP group: this rank holds rows ``[tp_rank::]`` block."""

    def __init__(self, dense: nn.Linear, tp_rank: int, tp_size: int, group: Any) -> None:
        super().__init__()
        out = dense.out_features
        if out % tp_size:
            raise ValueError(f"{out} output features do not split into {tp_size} shards")
        block = out // tp_size
        rows = slice(tp_rank * block, (tp_rank + 1) * block)
        self.weight = nn.Parameter(dense.weight.detach()[rows].clone())
        self.bias = nn.Parameter(dense.bias.detach()[rows].clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _CopyToTensorParallel.apply(x, self.group)  # type: ignore[no-untyped-call]
        return nn.functional.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Input features split across the TP group; partial outputs all-reduced, bias added once."""

    def __init__(self, dense: nn.Linear, tp_rank: int, tp_size: int, group: Any) -> None:
        super().__init__()
        fan_in = dense.in_features
        if fan_in % tp_size:
            raise ValueError(f"{fan_in} input features do not split into {tp_size} shards")
        block = fan_in // tp_size
        cols = slice(tp_rank * block, (tp_rank + 1) * block)
        self.weight = nn.Parameter(dense.weight.detach()[:, cols].clone())
        self.bias = nn.Parameter(dense.bias.detach().clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(x, self.weight)
        reduced: torch.Tensor = _ReduceFromTensorParallel.apply(partial, self.group)  # type: ignore[no-untyped-call]
        return reduced + self.bias


class TensorParallelMLP(nn.Module):
    """``ColumnParallel -> GELU -> Dropout -> RowParallel``: a Megatron-style MLP block."""

    def __init__(self, hidden: int, dropout: float, tp_rank: int, tp_size: int, group: Any) -> None:
        super().__init__()
        first, second = nn.Linear(IN_DIM, hidden), nn.Linear(hidden, OUT_DIM)
        self.up = ColumnParallelLinear(first, tp_rank, tp_size, group)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.down = RowParallelLinear(second, tp_rank, tp_size, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down(self.drop(self.act(self.up(x))))
        return out
