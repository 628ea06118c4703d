"""``single``: one process; everything GLOBAL except the random generators."""

from __future__ import annotations

from torch import nn

from harness.models import mlp
from harness.trainers.base import Trainer

__all__ = ["SingleTrainer"]


class SingleTrainer(Trainer):
    """A plain training loop in a world of one."""

    name = "single"

    def build(self) -> None:
        self.model = mlp(self.hidden, self.dropout).to(self.device)
        self.loader = self.dataset(shard=0, batch_size=self.scenario.run.batch_size)

    def forward_backward(self) -> float:
        x, y = self.to_device(*self.loader.next_batch())
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        return float(loss.item())
