"""A synthetic dataset and a stateful batch loader (``state_dict``/``load_state_dict``).

The loader walks a per-epoch permutation drawn from its own generator (seeded by
``seed`` and the epoch, never from the global RNG), so its position is all the
state it needs: resuming from ``state_dict()`` yields exactly the batches an
uninterrupted loader would have yielded.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["StatefulLoader", "SyntheticRegression"]


class SyntheticRegression:
    """``samples`` inputs of ``in_dim`` features and noisy non-linear targets of ``out_dim``.

    ``shard`` selects an independent slice of data (a different generator
    stream), for trainers whose ranks or replicas read different data.
    """

    def __init__(self, samples: int, in_dim: int, out_dim: int, seed: int, shard: int = 0) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + shard * 7919 + 17)
        self.x = torch.randn(samples, in_dim, generator=g)
        w = torch.randn(in_dim, out_dim, generator=g) / in_dim**0.5
        self.y = torch.tanh(self.x @ w) + 0.05 * torch.randn(samples, out_dim, generator=g)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets at ``indices``."""
        return self.x[indices], self.y[indices]


class StatefulLoader:
    """Batches of ``batch_size`` from a reshuffled permutation per epoch; drops the tail.

    State: ``epoch``, ``position`` (batches served in this epoch), ``served``
    (batches served in total), plus ``seed`` and ``batch_size``, which a load
    checks so that state from another configuration is refused, not misread.
    """

    def __init__(self, dataset: SyntheticRegression, batch_size: int, seed: int) -> None:
        if batch_size > len(dataset):
            raise ValueError(
                f"batch_size {batch_size} exceeds the dataset's {len(dataset)} samples"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self.served = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 31 + epoch)
        return torch.randperm(len(self.dataset), generator=g)

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one epoch."""
        return len(self.dataset) // self.batch_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (inputs, targets); starts a new epoch when one is exhausted."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.batch_size
        indices = self._order[start : start + self.batch_size]
        self.position += 1
        self.served += 1
        return self.dataset.batch(indices)

    def state_dict(self) -> dict[str, Any]:
        """Position and configuration; plain ints only."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "served": self.served,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; ``ValueError`` if seed or batch size differ."""
        for name in ("seed", "batch_size"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"loader state has {name}={state[name]}, this loader has {getattr(self, name)}"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.served = int(state["served"])
        self._order = self._permutation(self.epoch)
