"""A synchronous save encodes each next component in a helper thread while it writes the one before.

These tests check what must not change: the files are the same bytes, a component that
cannot be encoded still fails the save with its path named (and leaves no checkpoint and
the previous one intact), ``state_dict()`` is still called in the caller's thread, and
a failure while writing stops the helper cleanly.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointError,
    SerializationError,
    StateComponent,
    codec,
    storage,
)
from distckpt.manifest import CheckpointManifest


class Box:
    """A Stateful that records the thread of every ``state_dict()`` call."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.threads: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _boxes() -> list[Box]:
    g = torch.Generator().manual_seed(3)
    return [Box({f"w{i}": torch.randn(64, generator=g) for i in range(20)}) for _ in range(3)]


def _coordinator(tmp_path: Path, boxes: list[Box]) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent(f"c{k}", b, "global") for k, b in enumerate(boxes)],
                                 output_dir=tmp_path)


def test_every_component_file_holds_exactly_its_encoding(tmp_path: Path) -> None:
    boxes = _boxes()
    path = _coordinator(tmp_path, boxes).save_checkpoint()
    manifest = CheckpointManifest.load(f"{path}/manifest.json")
    for k, box in enumerate(boxes):
        entry = manifest.components[f"c{k}"].files[0]
        data = storage.read_verified(f"{path}/{entry.path}", entry.size_bytes, entry.checksum)
        assert bytes(data) == codec.encode(box.state).to_bytes()


def test_state_dict_is_called_in_the_callers_thread(tmp_path: Path) -> None:
    boxes = _boxes()
    _coordinator(tmp_path, boxes).save_checkpoint()
    caller = threading.current_thread().name
    assert all(box.threads and set(box.threads) == {caller} for box in boxes)


def test_a_later_component_that_cannot_be_encoded_fails_the_save_naming_its_path(tmp_path: Path) -> None:
    boxes = _boxes()
    coordinator = _coordinator(tmp_path, boxes)
    first = coordinator.save_checkpoint()
    boxes[2].state["bad"] = {"inner": object()}
    with pytest.raises(SerializationError, match=r"bad\.inner: type builtins\.object is not serializable"):
        coordinator.save_checkpoint()
    assert coordinator.latest_checkpoint() == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [Path(first).name]


def test_a_write_that_fails_midway_stops_the_helper_and_the_next_save_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boxes = _boxes()
    coordinator = _coordinator(tmp_path, boxes)
    real = storage.write_runs
    calls = []

    def failing(path: str, runs: Any, **options: Any) -> Any:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, runs, **options)

    monkeypatch.setattr(storage, "write_runs", failing)
    with pytest.raises(CheckpointError, match="No space left"):
        coordinator.save_checkpoint()
    monkeypatch.setattr(storage, "write_runs", real)
    assert not any(t.name.startswith("distckpt-encode") for t in threading.enumerate())
    path = coordinator.save_checkpoint()
    assert set(CheckpointManifest.load(f"{path}/manifest.json").components) == {"c0", "c1", "c2"}
