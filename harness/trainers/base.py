"""The trainer base class: seeding, optimizer and scheduler, components, fingerprints.

A trainer owns the state of one rank of a tiny but real training job: model
(with dropout), AdamW, a warm-up + cosine LR schedule, a stateful data loader
and the random generators. It is deterministic given the scenario's seed, so a
reference run and a save/teardown/load/resume run can be compared bit for bit.

``fresh=True`` builds a trainer for a resuming world: its model, generators
and everything else start from *different* values, so only a correct load can
make the resumed run match the reference.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distckpt import RNGState
from harness.data import StatefulLoader, SyntheticRegression
from harness.models import IN_DIM, OUT_DIM
from harness.scenario import Scenario, Topology

__all__ = ["Trainer", "digest_leaves", "seed_everything"]

_FRESH_OFFSET = 100_003


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(ABC):
    """One rank of a mini training job. Subclasses build the model and define a step."""

    name: ClassVar[str] = ""

    def __init__(
        self, scenario: Scenario, topology: Topology, device: torch.device, *, fresh: bool = False
    ) -> None:
        self.scenario = scenario
        self.topology = topology
        self.device = device
        self.fresh = fresh
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size != topology.world_size:
            raise RuntimeError(
                f"trainer {self.name}: world has {self.world_size} ranks, "
                f"topology {topology.describe()} has {topology.world_size}"
            )
        opts = scenario.options
        self.hidden: int = int(opts.get("hidden", 16))
        self.dropout: float = float(opts.get("dropout", 0.1))
        self.lr: float = float(opts.get("lr", 1e-2))
        self.samples: int = int(opts.get("samples", 256))
        self.seed = scenario.run.seed + (_FRESH_OFFSET if fresh else 0)
        self.step_count = 0
        seed_everything(self.seed)  # identical model initialisation on every rank
        self.model: nn.Module
        self.loader: StatefulLoader
        self.data_owner = True
        self.build()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.01)
        self.scheduler = _scheduler(self.optimizer, scenario.run.steps)
        self.rng = RNGState()
        seed_everything(self.seed * 1000 + self.rank)  # each rank its own random stream

    # -- to implement ----------------------------------------------------

    @abstractmethod
    def build(self) -> None:
        """Create ``self.model`` (and groups, wrappers) and ``self.loader``; set ``data_owner``."""

    @abstractmethod
    def forward_backward(self) -> float:
        """One step's forward and backward (gradients synchronised); returns this rank's loss."""

    # -- shared ----------------------------------------------------------

    def dataset(self, shard: int, batch_size: int) -> StatefulLoader:
        """A loader over data shard ``shard`` (seeded by the scenario, not by ``fresh``)."""
        data = SyntheticRegression(self.samples, IN_DIM, OUT_DIM, self.scenario.run.seed, shard)
        return StatefulLoader(data, batch_size, seed=self.scenario.run.seed + shard)

    def process_groups(self) -> Any:
        """What the coordinator gets as ``process_groups``: ``None``, a dict or a DeviceMesh."""
        return None

    def components(self) -> dict[str, Any]:
        """Every stateful this trainer offers, by component key."""
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "dataset": self.loader,
            "rng": self.rng,
        }

    def train_step(self, before_update: Callable[[], None] | None = None) -> float:
        """One optimisation step; returns this rank's loss. ``before_update()`` runs between the
        backward pass and the optimizer step (a save staged in the background waits there)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward()
        if before_update is not None:
            before_update()
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        return loss

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``tensors`` moved to this rank's device."""
        return [t.to(self.device) for t in tensors]

    def diverge(self, key: str) -> None:
        """Perturb component ``key`` on this rank (fault injection: a diverged replica)."""
        state = self.components()[key].state_dict()
        for _, leaf in _leaves(state, key):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.numel():
                with torch.no_grad():
                    leaf.view(-1)[0] += 1e-3
                return
        raise ValueError(f"component {key!r} has no floating-point tensor to perturb")

    def fingerprint(self) -> dict[str, dict[str, str]]:
        """Per component, a digest of every leaf of its state (the data position only
        where this rank's loader is authoritative). Equal fingerprints = bit-identical state."""
        out: dict[str, dict[str, str]] = {}
        for key, stateful in self.components().items():
            if key == "dataset" and not self.data_owner:
                out[key] = {}
                continue
            out[key] = digest_leaves(stateful.state_dict(), key)
        return out

    def state_snapshot(self) -> dict[str, Any]:
        """Deep copies of every component's state (for an in-memory hand-over)."""
        return {k: _to_cpu(v.state_dict()) for k, v in self.components().items()}


def _scheduler(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = min(2, max(1, steps - 1))
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.25, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup)),
        ],
        milestones=[warmup],
    )


def _leaves(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k in sorted(obj, key=repr):
            yield from _leaves(obj[k], f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}.{i}")
    else:
        yield path, obj


def digest_leaves(state: Any, prefix: str) -> dict[str, str]:
    """``{leaf path: digest}`` for a state dict: tensors and arrays by dtype, shape and bytes."""
    out: dict[str, str] = {}
    for path, leaf in _leaves(state, prefix):
        h = hashlib.blake2b(digest_size=12)
        if isinstance(leaf, torch.Tensor):
            shard = leaf.to_local() if hasattr(leaf, "to_local") else leaf  # a DTensor: this rank's shard
            t = shard.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(leaf.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(leaf, np.ndarray):
            h.update(f"{leaf.dtype}{leaf.shape}".encode())
            h.update(np.ascontiguousarray(leaf).tobytes())
        elif isinstance(leaf, float):
            h.update(leaf.hex().encode())
        else:
            h.update(repr(leaf).encode())
        out[path] = h.hexdigest()
    return out


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return obj.copy()
    return obj
