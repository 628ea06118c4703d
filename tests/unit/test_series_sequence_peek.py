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


def _old_latest(parent: str) -> str | None:
    committed = [e for e in series.list_checkpoints(parent) if e.committed]
    return committed[-1].path if committed else None


def test_latest_parses_one_manifest_when_the_newest_is_sound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = _coordinator(tmp_path)
    paths = [c.save_checkpoint(checkpoint_id=f"c{i}") for i in range(6)]
    calls = _count_full_parses(monkeypatch)
    assert c.latest_checkpoint() == paths[-1]
    assert len(calls) == 1


def test_latest_passes_over_a_newest_manifest_damaged_after_its_first_bytes(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    older = c.save_checkpoint(checkpoint_id="older")
    newer = Path(c.save_checkpoint(checkpoint_id="newer"))
    (newer / MANIFEST_NAME).write_bytes((newer / MANIFEST_NAME).read_bytes()[:400])
    assert c.latest_checkpoint() == older == _old_latest(c.checkpoints_dir)


def test_latest_agrees_with_the_full_listing_on_ties_reorderings_and_damage(tmp_path: Path) -> None:
    c = _coordinator(tmp_path)
    paths = [Path(c.save_checkpoint(checkpoint_id=name)) for name in ("b", "a", "d", "c", "e")]
    root = c.checkpoints_dir

    def rewrite(path: Path, sequence: int, *, reorder: bool = False, timestamp: str | None = None) -> None:
        data = json.loads((path / MANIFEST_NAME).read_text())
        data["sequence"] = sequence
        if timestamp is not None:
            data["timestamp"] = timestamp
        if reorder:
            data = dict(sorted(data.items()))
        (path / MANIFEST_NAME).write_text(json.dumps(data, indent=2))

    rewrite(paths[0], 9)  # a tie on the highest sequence, broken by timestamp then name
    rewrite(paths[1], 9, timestamp="2099-01-01T00:00:00.000000Z")
    assert series.latest_committed(root) == _old_latest(root) == str(paths[1])
    rewrite(paths[2], 12, reorder=True)  # the newest in another key order: found by the full parse
    assert series.latest_committed(root) == _old_latest(root) == str(paths[2])
    (paths[2] / MANIFEST_NAME).write_text("{}")  # now broken: the tie at 9 wins again
    assert series.latest_committed(root) == _old_latest(root) == str(paths[1])
    for p in paths:
        (p / MANIFEST_NAME).unlink()
    assert series.latest_committed(root) is None is _old_latest(root)
