"""The benchmark's training states, built identically inside every rank.

Each workload describes, for one rank of a world, the components it declares:
their key, sharing pattern, group name, replica set and the state itself. The
content is deterministic (seeded by replica set), so replicas really are
identical and different sets really differ, exactly as a trainer's state would be.

Sizes at ``scale=1`` are the issue's:

- ``big``: ~1 GB fp32 in ~100 tensors (33 parameters + AdamW ``exp_avg`` and
  ``exp_avg_sq``, plus 33 scalar ``step`` tensors), model and optimizer REPLICATED.
- ``small``: ~100 MB in 10,000 tensors (2,500 parameters of 3,333 floats, with
  ``exp_avg``, ``exp_avg_sq`` and a scalar ``step`` each), REPLICATED. Scaling
  shrinks the *number* of tensors and keeps each tensor's size, so the
  per-tensor overhead that this workload exists to expose keeps its weight.
- ``hybrid``: the ``big`` model + optimizer split into ``tp`` shards on a
  ``dp x tp`` mesh (dp=2 when the world has 2 ranks or more); model and
  optimizer ``PER_GROUP("dp")`` (one file per TP shard), a small data-loader
  state ``PER_GROUP("tp")`` (one per replica).
- ``rng``: :class:`distckpt.RNGState` and a data-loader state (epoch, position,
  a sampler permutation of 1M*scale int64) ``PER_RANK``.
- ``huge``: 8 fp32 tensors of 128 MiB each (1 GiB), REPLICATED: few, very large
  tensors (scaling shrinks each tensor, never their number).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

BIG_BYTES = 1_000_000_000
BIG_PARAMS = 33
SMALL_PARAMS = 2_500
SMALL_FLOATS = 3_333
RNG_PERM = 1_000_000
HUGE_TENSORS = 8
HUGE_TENSOR_BYTES = 128 * 2**20
WORKLOADS = ("big", "small", "hybrid", "rng", "huge")


def mesh_shape(world: int) -> tuple[int, int]:
    """(dp, tp) of the hybrid workload: dp=2 when possible, as in the design's example."""
    dp = 2 if world >= 2 and world % 2 == 0 else 1
    return dp, world // dp


def full_bytes_per_rank(workload: str, world: int) -> int:
    """Approximate state bytes one rank holds at scale 1 (for the memory budget)."""
    if workload == "big":
        return BIG_BYTES
    if workload == "small":
        return SMALL_PARAMS * SMALL_FLOATS * 4 * 3
    if workload == "hybrid":
        return BIG_BYTES // mesh_shape(world)[1]
    if workload == "huge":
        return HUGE_TENSORS * HUGE_TENSOR_BYTES
    return RNG_PERM * 8


def effective_scale(workload: str, world: int, scale: float, budget_bytes: float) -> float:
    """``scale``, reduced so that the world's total state stays under ``budget_bytes``."""
    total = full_bytes_per_rank(workload, world) * world * scale
    if total <= budget_bytes:
        return scale
    return budget_bytes / (full_bytes_per_rank(workload, world) * world)


@dataclass
class Comp:
    """One declared component as seen by one rank."""

    key: str
    pattern: str                   # SharingPattern value
    group: str | None              # PER_GROUP name
    members: tuple[int, ...]       # this rank's replica set
    set_index: int                 # index of that set (ordered by lowest rank)
    holder: Any                    # the Stateful
    validatable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def writer(self) -> int:
        return min(self.members)


class Holder:
    """A Stateful that loads in place, like ``nn.Module``/``Optimizer.load_state_dict``.

    ``state_dict()`` returns the live state (tensors are not copied);
    ``load_state_dict(sd)`` copies tensors into the existing ones and replaces
    other values, so a load must move the bytes into the trainer's memory.
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = copy_into(self.state, state)


class RNGHolder:
    """:class:`distckpt.RNGState` (imported lazily so this module stays light)."""

    def __init__(self) -> None:
        from distckpt import RNGState

        self._rng = RNGState()

    def state_dict(self) -> Any:
        return self._rng.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self._rng.load_state_dict(state)


def copy_into(live: Any, new: Any) -> Any:
    """Copy ``new`` into ``live`` in place where shapes allow; return the result.

    A tensor that already *is* the live one (an in-place load) is kept as is,
    which is what ``live.copy_(live)`` amounts to, without the Python checks.
    """
    if live is new:
        return live
    if isinstance(live, torch.Tensor) and isinstance(new, torch.Tensor) and live.shape == new.shape \
            and live.dtype == new.dtype:
        live.copy_(new)
        return live
    if isinstance(live, dict) and isinstance(new, dict):
        for k, v in new.items():
            live[k] = copy_into(live[k], v) if k in live else v
        return live
    if isinstance(live, list) and isinstance(new, list) and len(live) == len(new):
        for i, v in enumerate(new):
            live[i] = copy_into(live[i], v)
        return live
    return new


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _adamw(params: dict[str, torch.Tensor], seed: int) -> dict[str, Any]:
    g = _gen(seed + 1)
    state: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(params.values()):
        state[i] = {
            "step": torch.tensor(1000.0),
            "exp_avg": torch.rand(p.shape, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6,
        }
    return {
        "state": state,
        "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                          "amsgrad": False, "maximize": False, "foreach": None,
                          "capturable": False, "differentiable": False, "fused": None,
                          "params": list(range(len(params)))}],
    }


def _big_model(scale: float, seed: int, shard: int = 1) -> dict[str, torch.Tensor]:
    per_param = max(1024, int(BIG_BYTES * scale / 4 / (3 * BIG_PARAMS)))
    cols = 1024
    rows = max(1, per_param // cols // shard)
    g = _gen(seed)
    return {f"layers.{i}.weight": torch.rand(rows, cols, generator=g) for i in range(BIG_PARAMS)}


def build(workload: str, scale: float, rank: int, world: int) -> list[Comp]:
    """The components of ``rank`` in a world of ``world`` ranks, at ``scale``."""
    everyone = tuple(range(world))
    if workload == "big":
        model = _big_model(scale, seed=1)
        optim = _adamw(model, seed=1)
        return [Comp("model", "replicated", None, everyone, 0, Holder(model)),
                Comp("optimizer", "replicated", None, everyone, 0, Holder(optim))]
    if workload == "small":
        n = max(10, round(SMALL_PARAMS * scale))
        g = _gen(2)
        model = {f"blocks.{i}.bias": torch.rand(SMALL_FLOATS, generator=g) for i in range(n)}
        optim = _adamw(model, seed=2)
        return [Comp("model", "replicated", None, everyone, 0, Holder(model)),
                Comp("optimizer", "replicated", None, everyone, 0, Holder(optim))]
    if workload == "huge":
        g = _gen(3)
        floats = max(1024, int(HUGE_TENSOR_BYTES * scale) // 4)
        model = {f"experts.{i}.weight": torch.rand(floats // 1024, 1024, generator=g) for i in range(HUGE_TENSORS)}
        return [Comp("model", "replicated", None, everyone, 0, Holder(model))]
    if workload == "hybrid":
        _dp, tp = mesh_shape(world)
        d, t = divmod(rank, tp)
        dp_members = tuple(r for r in everyone if r % tp == t)
        tp_members = tuple(range(d * tp, (d + 1) * tp))
        model = _big_model(scale, seed=100 + t, shard=tp)
        optim = _adamw(model, seed=100 + t)
        loader = {"epoch": 3, "position": 12345 + d, "seed": 7 + d,
                  "order": torch.randperm(max(1, int(RNG_PERM * scale)), generator=_gen(500 + d))}
        return [Comp("model", "per_group", "dp", dp_members, t, Holder(model)),
                Comp("optimizer", "per_group", "dp", dp_members, t, Holder(optim)),
                Comp("dataloader", "per_group", "tp", tp_members, d, Holder(loader))]
    if workload == "rng":
        import random

        import numpy as np

        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(rank)
        loader = {"epoch": 3, "position": 777 * rank, "seed": rank,
                  "order": torch.randperm(max(1, int(RNG_PERM * scale)), generator=_gen(900 + rank))}
        return [Comp("rng", "per_rank", None, (rank,), rank, RNGHolder(), validatable=False),
                Comp("dataloader", "per_rank", None, (rank,), rank, Holder(loader), validatable=False)]
    raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")


def tensor_leaves(state: Any) -> list[torch.Tensor]:
    """Every tensor leaf of a nested state, in traversal order."""
    out: list[torch.Tensor] = []
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            out.append(node)
        elif isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(list(node)))
    return out


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensor_leaves(state))


def count_tensors(state: Any) -> int:
    return len(tensor_leaves(state))


def describe(workload: str, scale: float, world: int) -> str:
    if workload == "hybrid":
        dp, tp = mesh_shape(world)
        return f"dp{dp}xtp{tp}"
    return ""


def mib(n: float) -> float:
    return n / 2**20


def fmt_bytes(n: float) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} B"


__all__ = [
    "WORKLOADS", "Comp", "Holder", "RNGHolder", "build", "copy_into", "count_tensors",
    "effective_scale", "fmt_bytes", "full_bytes_per_rank", "mesh_shape", "mib",
    "state_bytes", "tensor_leaves",
]
