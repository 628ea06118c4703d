"""RNGState: a Stateful over every random generator a training step may touch."""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

__all__ = ["RNGState"]

log = logging.getLogger("distckpt")


class RNGState:
    """Captures and restores Python ``random``, NumPy's global generator (when
    NumPy is importable), torch's CPU generator and every CUDA device's generator.

    Declare it ``PER_RANK``: every rank's generators differ. On load, CUDA
    states are restored for the devices both the checkpoint and this process
    have; a count mismatch is logged, not fatal (a job may resume on other GPUs).
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "python": random.getstate(),
            "torch": torch.get_rng_state(),
        }
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        else:
            state["numpy"] = np.random.get_state()
        if torch.cuda.is_available():
            state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        torch.set_rng_state(state_dict["torch"].clone())
        if "numpy" in state_dict:
            import numpy as np

            np.random.set_state(state_dict["numpy"])
        cuda = state_dict.get("cuda")
        if cuda and torch.cuda.is_available():
            count = torch.cuda.device_count()
            if count != len(cuda):
                log.warning("distckpt: checkpoint has RNG state for %d CUDA devices, this process sees %d",
                            len(cuda), count)
            for i, s in enumerate(cuda[:count]):
                torch.cuda.set_rng_state(s.clone(), i)
