"""The library functions under ``distckpt verify``, ``diff`` and ``convert`` (issue 13 item 5), called from Python."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointNotFoundError,
    ComponentMismatchError,
    DiffReport,
    IntegrityError,
    ManifestError,
    StateComponent,
    Topology,
    TopologyMismatchError,
    VerificationReport,
    diff_checkpoints,
    storage,
    verify_checkpoint,
)
from distckpt.legacy import legacy_inventory, plan_conversion, read_legacy_file
from tests.helpers import Box

pytestmark = pytest.mark.timeout(60)  # a FIFO that blocked would hang; fail instead


def save(out: Path, w: torch.Tensor, extra: bool = False) -> str:
    comps = [StateComponent("model", Box({"w": w, "step": 1}), "global")]
    if extra:
        comps.append(StateComponent("notes", Box({"n": 1}), "global"))
    return CheckpointCoordinator(comps, output_dir=out).save_checkpoint()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(save(tmp_path / "run", torch.arange(6.0)))


def test_verify_checkpoint_returns_a_frozen_report_of_an_intact_checkpoint(ckpt: Path) -> None:
    report = verify_checkpoint(ckpt)
    assert isinstance(report, VerificationReport)
    assert report.intact and report.problems == () and report.files == 1 and report.size_bytes > 0
    assert verify_checkpoint(ckpt / "manifest.json") == report  # the manifest's path works too
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.files = 0  # type: ignore[misc]


def test_verify_checkpoint_names_a_damaged_a_missing_and_an_unlisted_file(tmp_path: Path) -> None:
    path = Path(save(tmp_path / "run", torch.arange(6.0), extra=True))
    data = bytearray((path / "model" / "global.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model" / "global.safetensors").write_bytes(bytes(data))
    (path / "notes" / "global.safetensors").unlink()
    (path / "stray.txt").write_text("x")
    report = verify_checkpoint(path)
    assert not report.intact
    found = {(p.what, p.path) for p in report.problems}
    assert found == {("bad", "model/global.safetensors"), ("missing", "notes/global.safetensors"),
                     ("unlisted", "stray.txt")}
    bad = next(p for p in report.problems if p.what == "bad")
    assert "checksum mismatch" in bad.message and str(bad).startswith("BAD       model/global.safetensors:")


def test_verify_checkpoint_reports_progress_in_bytes(ckpt: Path) -> None:
    seen: list[int] = []
    report = verify_checkpoint(ckpt, progress=seen.append)
    assert sum(seen) == report.size_bytes


def test_verify_checkpoint_raises_for_a_path_that_is_not_a_readable_checkpoint(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no such file"):
        verify_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="not a distckpt checkpoint"):
        verify_checkpoint(tmp_path / "empty")
    (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError):
        verify_checkpoint(ckpt)


def test_a_fifo_in_place_of_a_checkpoint_file_is_reported_without_blocking(ckpt: Path) -> None:
    target = ckpt / "model" / "global.safetensors"
    target.unlink()
    os.mkfifo(target)
    report = verify_checkpoint(ckpt)
    assert [(p.what, p.message) for p in report.problems] == [("bad", "not a regular file")]


def test_diff_checkpoints_of_a_checkpoint_with_itself_is_the_same(ckpt: Path) -> None:
    report = diff_checkpoints(ckpt, ckpt)
    assert isinstance(report, DiffReport) and report.same and report.differences == ()
    assert report.components == ("model",) and report.files_a == 1


def test_diff_checkpoints_names_the_changed_entry_and_the_component_on_one_side(tmp_path: Path) -> None:
    a = save(tmp_path / "a", torch.arange(6.0), extra=True)
    b = save(tmp_path / "b", torch.arange(6.0) + torch.tensor([0, 0, 0, 0, 0, 2.5]))
    report = diff_checkpoints(a, b)
    assert not report.same and report.components == ("model", "notes")
    model, notes = report.differences
    assert notes.key == "notes" and notes.only_in == "A"
    assert model.only_in is None and len(model.files) == 1
    (entry,) = model.files[0].entries
    assert entry.startswith("w: max abs difference 2.5")


def test_diff_checkpoints_refuses_a_damaged_copy_with_an_integrity_error(tmp_path: Path, ckpt: Path) -> None:
    other = Path(save(tmp_path / "other", torch.arange(6.0)))
    (other / "model" / "global.safetensors").write_bytes(b"short")
    with pytest.raises(IntegrityError, match=r"model/global\.safetensors: B's copy is damaged"):
        diff_checkpoints(ckpt, other)


def write_legacy(d: Path) -> None:
    d.mkdir()
    for writer in (0, 1):
        torch.save({"w": torch.full((2,), float(writer))}, d / f"model_state_group_dp_grank_0_rank_{writer}.pt")
    torch.save({"step": 9}, d / "trainer_state.pt")


def test_plan_conversion_takes_patterns_and_sources_from_the_legacy_names(tmp_path: Path) -> None:
    write_legacy(tmp_path / "old")
    topology = Topology(4, groups={"dp": [[0, 2], [1, 3]]})
    model, trainer = plan_conversion(legacy_inventory(str(tmp_path / "old")), topology, {}, {}, False)
    assert model.key == "model" and model.plan.replica_sets == ((0, 2), (1, 3))
    assert sorted(model.sources.values()) == ["model_state_group_dp_grank_0_rank_0.pt",
                                              "model_state_group_dp_grank_0_rank_1.pt"]
    assert trainer.pattern.kind == "global" and list(trainer.sources.values()) == ["trainer_state.pt"]
    (replicated,) = plan_conversion([f for f in legacy_inventory(str(tmp_path / "old")) if f.key == "trainer"],
                                    topology, {"trainer": "replicated"}, {}, False)
    assert replicated.pattern.kind == "replicated"


def test_plan_conversion_raises_checkpoint_errors_for_a_layout_or_pattern_that_cannot_fit(tmp_path: Path) -> None:
    write_legacy(tmp_path / "old")
    files = legacy_inventory(str(tmp_path / "old"))
    with pytest.raises(TopologyMismatchError, match="per_group"):
        plan_conversion(files, Topology(4), {}, {}, False)
    with pytest.raises(TopologyMismatchError, match="several legacy files for replica set"):
        plan_conversion(files, Topology(4, groups={"dp": [[0, 1], [2, 3]]}), {}, {}, False)
    with pytest.raises(ComponentMismatchError, match="contradicts"):
        plan_conversion(files, Topology(4, groups={"dp": [[0, 2], [1, 3]]}), {"trainer": "per_rank"}, {}, False)


def test_a_legacy_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model_state.pt")
    with pytest.raises(IntegrityError, match="not a regular file"):
        read_legacy_file(str(tmp_path / "model_state.pt"))
    (tmp_path / "real_state.pt").write_bytes(b"")
    os.symlink(tmp_path / "real_state.pt", tmp_path / "link_state.pt")
    with pytest.raises(IntegrityError, match="symlink"):
        read_legacy_file(str(tmp_path / "link_state.pt"))


def test_write_through_temp_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def fail(f: object) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        storage.write_through_temp(str(target), fail)
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["out.pt"]
    storage.write_through_temp(str(target), lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["out.pt"]
