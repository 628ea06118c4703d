"""A save's sequence number comes from the first bytes of each committed manifest, not a full parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distckpt import CheckpointCoordinator, StateComponent, series
from distckpt.manifest import MANIFEST_NAME, CheckpointManifest
from tests.helpers import Box


def _coordinator(root: Path) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], output_dir=root)


def _count_full_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = CheckpointManifest.from_json.__func__  # type: ignore[attr-defined]

    def counted(cls: type[CheckpointManifest], data: bytes, where: str = "<manifest>") -> CheckpointManifest:
        calls.append(where)
        return real(cls, data, where=where)

    monkeypatch.setattr(CheckpointManifest, "from_json", classmethod(counted))
    return calls


def test_a_save_reads_no_earlier_manifest_in_full_to_number_itself(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    c = _coordinator(tmp_path)
    for i in range(5):
        c.save_checkpoint(checkpoint_id=f"c{i}")
    calls = _count_full_parses(monkeypatch)
    path = c.save_checkpoint(checkpoint_id="next")
    assert calls == []
    assert CheckpointManifest.load(Path(path) / MANIFEST_NAME).sequence == 6


def test_a_manifest_in_another_key_order_is_parsed_in_full_and_still_counts(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    c = _coordinator(tmp_path)
    first = Path(c.save_checkpoint(checkpoint_id="first"))
    text = json.loads((first / MANIFEST_NAME).read_text())
    text["sequence"] = 41
    reordered = dict(sorted(text.items()))  # "checkpoint_id" first: not distckpt's own order
    (first / MANIFEST_NAME).write_text(json.dumps(reordered, separators=(",", ":")))
    calls = _count_full_parses(monkeypatch)
    assert series.committed_sequences(c.checkpoints_dir) == [41]
    assert len(calls) == 1
    assert CheckpointManifest.load(Path(c.save_checkpoint(checkpoint_id="second")) / MANIFEST_NAME).sequence == 42


def test_directories_without_a_readable_manifest_give_no_sequence(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    c.save_checkpoint(checkpoint_id="good")
    root = Path(c.checkpoints_dir)
    (root / "checkpoint-empty").mkdir()
    (root / "checkpoint-garbage").mkdir()
    (root / "checkpoint-garbage" / MANIFEST_NAME).write_bytes(b'{"format": "distckpt", "sequence": 99}' + b"\xff" * 64)
    (root / "checkpoint-dirlike").mkdir()
    (root / "checkpoint-dirlike" / MANIFEST_NAME).mkdir()
    (root / ".checkpoint-x.staging-1").mkdir()
    (root / "checkpoint-link").symlink_to(root / "checkpoint-good")
    assert series.committed_sequences(c.checkpoints_dir) == [1]


def test_a_manifest_damaged_after_its_first_bytes_still_raises_the_next_sequence(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    first = Path(c.save_checkpoint(checkpoint_id="first"))
    data = (first / MANIFEST_NAME).read_bytes()
    (first / MANIFEST_NAME).write_bytes(data[:300])  # truncated: not a committed checkpoint any more
    assert series.committed_sequences(c.checkpoints_dir) == [1]
    assert c.latest_checkpoint() is None  # a load still parses in full and skips it
    second = Path(c.save_checkpoint(checkpoint_id="second"))
    assert CheckpointManifest.load(second / MANIFEST_NAME).sequence == 2
