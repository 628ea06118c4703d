"""State dicts that hold ``nn.Parameter``s that require grad (a hand-written ``state_dict`` returning
``dict(model.named_parameters())``, say) save and load like plain tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distckpt import CheckpointCoordinator, StateComponent
from tests.helpers import Box


def _parameters(count: int, seed: int) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3,), (2, 5), (), (0,), (4, 4)]
    return {f"p{i}": torch.nn.Parameter(torch.randn(shapes[i % len(shapes)], generator=gen))
            for i in range(count)}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("count", [5, 40], ids=["few", "many"])
def test_parameters_that_require_grad_round_trip_bit_exact_into_the_live_parameters(
        tmp_path: Path, async_save: bool, count: int) -> None:
    saved = _parameters(count, seed=1)
    expected = {k: v.detach().clone() for k, v in saved.items()}
    coord = CheckpointCoordinator([StateComponent("params", Box(saved), "replicated")], output_dir=str(tmp_path))
    result = coord.save_checkpoint(checkpoint_id="1", async_save=async_save)
    if async_save:
        result.result()  # type: ignore[union-attr]
    live = _parameters(count, seed=2)
    box = Box(live)
    CheckpointCoordinator([StateComponent("params", box, "replicated")], output_dir=str(tmp_path)).load_checkpoint()
    assert set(box.state) == set(expected)
    for key, want in expected.items():
        got = box.state[key]
        assert torch.equal(got.detach(), want), key
        if want.numel():  # read in place: the live Parameter itself (an empty one has no bytes to read)
            assert got is live[key], f"{key} was not read into the live parameter"
    loss = sum((p * p).sum() for p in live.values())
    loss.backward()  # type: ignore[union-attr]
    assert all(p.grad is not None for p in live.values())
