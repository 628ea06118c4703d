"""The writer's packed runs: 0-d, 1-d and n-d tensors (Parameters that require grad among them)
copied back to back, one call per run, give exactly the encoded bytes and their checksum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import codec, hashing, storage


def _state(kind: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(8)
    if kind == "0d-and-1d":  # an optimizer's steps between its moments
        return {i: {"step": torch.tensor(float(i)), "m": torch.randn(5, generator=g),
                    "p": torch.nn.Parameter(torch.randn(3, generator=g))} for i in range(30)}
    if kind == "only-0d":
        return {f"s{i}": torch.tensor(i, dtype=torch.int64) for i in range(20)}
    return {f"w{i}": torch.randn(2, 3, generator=g) if i % 3 else torch.tensor(1.5) for i in range(30)}


@pytest.mark.parametrize("kind", ["0d-and-1d", "only-0d", "with-2d"])
def test_a_run_of_small_tensors_is_written_as_its_exact_encoding(tmp_path: Path, kind: str) -> None:
    encoded = codec.encode(_state(kind))
    runs = list(encoded.runs())
    assert any(isinstance(item, list) and len(item) > 1 for item, _ in runs)  # packed runs are exercised
    size, checksum = storage.write_runs(str(tmp_path / "f"), iter(runs))
    expected = encoded.to_bytes()
    assert (tmp_path / "f").read_bytes() == expected
    assert (size, checksum) == (len(expected), hashing.checksum_of(expected))
