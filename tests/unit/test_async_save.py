"""Asynchronous saves: snapshot semantics, background errors on every rank, same atomicity."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from distckpt import CheckpointCoordinator, CrossRankError, SaveHandle, StateComponent
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, threads


def test_an_async_save_snapshots_state_so_later_training_does_not_leak_in(tmp_path: Path) -> None:
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    gate = threading.Event()

    def hook(phase: str, rank: int) -> None:
        if phase == "write":
            gate.wait(10)  # hold the background writer until the trainer has moved on

    coord = CheckpointCoordinator([StateComponent("model", model, "global"), StateComponent("opt", opt, "global")],
                                  output_dir=tmp_path, phase_hook=hook)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    assert isinstance(handle, SaveHandle) and not handle.done()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    gate.set()
    assert handle.result(30) == str(tmp_path / "checkpoints" / "checkpoint-1")
    restored = torch.nn.Linear(64, 64)
    CheckpointCoordinator([StateComponent("model", restored, "global"), StateComponent("opt", torch.optim.AdamW(restored.parameters()), "global")],
                          output_dir=tmp_path).load_checkpoint()
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in expected.items())


def test_an_async_failure_on_one_rank_surfaces_on_every_rank_and_commits_nothing(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> list[str]:
        def hook(phase: str, rank: int) -> None:
            if phase == "write" and rank == 1 and "bad" in seen:
                raise OSError(28, "No space left on device")

        seen: set[str] = set()
        coord = CheckpointCoordinator([StateComponent("s", Box({"w": torch.full((3,), float(comm.rank))}), "per_rank")],
                                      dist=comm, output_dir=tmp_path, phase_hook=hook)
        good = coord.save_checkpoint(checkpoint_id="good", async_save=True)
        assert coord.wait() == good.path
        seen.add("bad")
        bad = coord.save_checkpoint(checkpoint_id="bad", async_save=True)
        outcome = []
        try:
            bad.result(30)
        except CrossRankError as exc:
            outcome.append(f"{type(exc).__name__}:{sorted(exc.failures)}")
        seen.clear()
        assert coord.wait() is None  # result() already raised it: not raised twice
        outcome.append(os.path.basename(coord.save_checkpoint(checkpoint_id="after")))
        outcome.append(os.path.basename(str(coord.latest_checkpoint())))
        return outcome

    results = all_ok(threads(3, fn))
    assert results == [["CrossRankError:[1]", "checkpoint-after", "checkpoint-after"]] * 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-after", "checkpoint-good"]


def test_the_next_save_raises_a_pending_async_error_on_every_rank(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> str:
        def hook(phase: str, rank: int) -> None:
            if phase == "commit" and rank == 2:
                raise RuntimeError("injected")

        coord = CheckpointCoordinator([StateComponent("s", Box({"x": 1}), "replicated")], dist=comm,
                                      output_dir=tmp_path, phase_hook=hook)
        coord.save_checkpoint(async_save=True)
        try:
            coord.save_checkpoint()
        except CrossRankError as exc:
            return f"{exc.phase}:{sorted(exc.failures)}"
        return "no error"

    assert all_ok(threads(3, fn)) == ["commit:[2]"] * 3
    assert os.listdir(tmp_path / "checkpoints") == []


def test_async_saves_in_a_row_each_commit_in_order(tmp_path: Path) -> None:
    box = Box({"step": 0})
    coord = CheckpointCoordinator([StateComponent("t", box, "global")], output_dir=tmp_path, keep_last=2)
    for step in range(1, 5):
        box.state = {"step": step}
        coord.save_checkpoint(checkpoint_id=str(step), async_save=True)
    assert coord.wait() is not None
    assert sorted(os.listdir(coord.checkpoints_dir)) == ["checkpoint-3", "checkpoint-4"]
    out = Box()
    CheckpointCoordinator([StateComponent("t", out, "global")], output_dir=tmp_path).load_checkpoint()
    assert out.state == {"step": 4}


def test_consecutive_async_saves_reuse_snapshot_buffers_without_mixing_checkpoints(tmp_path: Path) -> None:
    weights = torch.nn.Linear(16, 16)
    coord = CheckpointCoordinator([StateComponent("model", weights, "global")], output_dir=tmp_path)
    expected = []
    previous: dict[int, torch.Tensor] = {}
    for step in range(3):
        with torch.no_grad():
            weights.weight.fill_(float(step))
        expected.append(weights.weight.detach().clone())
        coord.save_checkpoint(checkpoint_id=str(step), async_save=True)
        buffers = dict(coord._async.snapshots["model"])
        if step:
            assert all(buffers[i] is previous[i] for i in buffers)  # same host memory, no new allocation
        previous = buffers
    coord.wait()
    for step in range(3):
        restored = torch.nn.Linear(16, 16)
        CheckpointCoordinator([StateComponent("model", restored, "global")], output_dir=tmp_path).load_checkpoint(
            tmp_path / "checkpoints" / f"checkpoint-{step}")
        assert torch.equal(restored.weight, expected[step])


def _three_components(seed: int) -> dict[str, Box]:
    gen = torch.Generator().manual_seed(seed)
    return {k: Box({"w": torch.randn(64 * 1024, generator=gen), "n": i}) for i, k in enumerate("abc")}


def test_an_async_save_beyond_the_memory_budget_waits_for_the_writer_and_saves_the_same_state(tmp_path: Path) -> None:
    boxes = _three_components(0)
    expected = {k: b.state["w"].clone() for k, b in boxes.items()}
    events: list[str] = []
    gate = threading.Event()

    def hook(phase: str, rank: int) -> None:
        if phase == "write":
            gate.wait(10)

    def open_gate() -> None:
        events.append("gate opened")
        gate.set()

    # 256 KiB per component; a budget of 300 KiB holds one file's copy at a time
    coord = CheckpointCoordinator([StateComponent(k, b, "global") for k, b in boxes.items()], output_dir=tmp_path,
                                  phase_hook=hook, async_snapshot_bytes=300 * 1024)
    timer = threading.Timer(0.5, open_gate)
    timer.start()
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    events.append("returned")
    timer.join()
    assert events == ["gate opened", "returned"]  # the snapshot waited for the writer to free memory
    for b in boxes.values():
        b.state["w"].add_(1.0)  # training goes on; the checkpoint keeps the values at save time
    assert handle.result(30)
    assert coord._async.snapshots == {}  # nothing kept beyond the budget for the next save
    restored = _three_components(1)
    CheckpointCoordinator([StateComponent(k, b, "global") for k, b in restored.items()],
                          output_dir=tmp_path).load_checkpoint()
    assert all(torch.equal(restored[k].state["w"], v) for k, v in expected.items())


def test_an_async_save_within_the_memory_budget_returns_before_the_writer_runs(tmp_path: Path) -> None:
    boxes = _three_components(0)
    gate = threading.Event()
    coord = CheckpointCoordinator([StateComponent(k, b, "global") for k, b in boxes.items()], output_dir=tmp_path,
                                  phase_hook=lambda phase, rank: gate.wait(10) if phase == "write" else None,
                                  async_snapshot_bytes=1024 * 1024)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    assert not handle.done()  # returned with the writer still held at its gate
    gate.set()
    assert handle.result(30)
    assert set(coord._async.snapshots) == set(boxes)  # the copies are kept for the next save


def test_a_memory_budget_must_be_a_positive_int_or_none(tmp_path: Path) -> None:
    import pytest

    for bad in (0, -1, 1.5, "1"):
        with pytest.raises(ValueError, match="async_snapshot_bytes"):
            CheckpointCoordinator([], output_dir=tmp_path, async_snapshot_bytes=bad)  # type: ignore[arg-type]
