"""The stateful loader resumes exactly where it stopped and refuses foreign state."""

from __future__ import annotations

import pytest
import torch

from harness.data import StatefulLoader, SyntheticRegression


def _loader(seed: int = 3, batch: int = 8) -> StatefulLoader:
    return StatefulLoader(SyntheticRegression(40, 8, 4, seed=seed), batch, seed=seed)


def test_a_resumed_loader_yields_the_same_batches_across_epochs() -> None:
    a = _loader()
    for _ in range(7):
        a.next_batch()
    b = _loader()
    b.load_state_dict(a.state_dict())
    for _ in range(9):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.state_dict() == b.state_dict()
    assert a.epoch == 3


def test_state_from_another_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        _loader(seed=4).load_state_dict(_loader(seed=3).state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        _loader(batch=4).load_state_dict(_loader(batch=8).state_dict())
