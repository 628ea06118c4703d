"""Asynchronous saves staged in the background: the call returns after the walk, the copy goes on
meanwhile, and a tensor changed in place before ``wait_staged()`` fails the save on every rank."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import CheckpointCoordinator, SaveHandle, StateChangedError, StateComponent
from distckpt.hostcopy import StateCopy
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, threads


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))


def _coord(model: torch.nn.Module, tmp_path: Path, **kw: Any) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", model, "global")], output_dir=tmp_path, **kw)


def _loaded(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    restored = _model(99)
    _coord(restored, tmp_path).load_checkpoint(tmp_path / "checkpoints" / name)
    return restored.state_dict()


def _staged_with_the_writer_held(tmp_path: Path) -> tuple[Box, threading.Event, CheckpointCoordinator, SaveHandle]:
    """A save staged in the background of ``{"w": zeros(1024)}`` whose writer waits for the event
    before its write phase."""
    box = Box({"w": torch.zeros(1024)})
    writer = threading.Event()
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path,
                                  phase_hook=lambda phase, rank: writer.wait(20) if phase == "write" else None)
    return box, writer, coord, coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)


def test_a_save_staged_in_the_background_returns_before_the_copy_and_keeps_the_state_of_the_call(
        tmp_path: Path, held_copy: threading.Event) -> None:
    model = _model(0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    coord = _coord(model, tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    assert isinstance(handle, SaveHandle)
    assert not handle.staged()  # returned while the copy still waits at its gate
    with pytest.raises(TimeoutError, match="still staging"):
        handle.wait_staged(0.05)
    model(torch.ones(2, 32)).sum().backward()  # a forward and backward pass change no saved tensor
    held_copy.set()
    handle.wait_staged(20)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the optimizer step, once staged: not in the checkpoint
    assert handle.result(30).endswith("checkpoint-1")
    assert all(torch.equal(_loaded(tmp_path, "checkpoint-1")[k], v) for k, v in expected.items())


def test_a_tensor_changed_in_place_while_staging_fails_the_save_naming_the_entry_and_commits_nothing(
        tmp_path: Path, held_copy: threading.Event) -> None:
    model = _model(0)
    coord = _coord(model, tmp_path)
    held_copy.set()
    before = coord.save_checkpoint(checkpoint_id="before", async_save=True, background_staging=True).result(30)
    held_copy.clear()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = coord.save_checkpoint(checkpoint_id="torn", async_save=True, background_staging=True)
    with torch.no_grad():
        model[1].bias.mul_(2.0)  # an optimizer step that did not wait for wait_staged()
    held_copy.set()
    with pytest.raises(StateChangedError, match=r"component 'model': entry '1\.bias' changed in place"):
        handle.result(30)
    assert handle.staged()
    assert sorted(os.listdir(coord.checkpoints_dir)) == ["checkpoint-before"]
    assert before.endswith("checkpoint-before")
    assert all(torch.equal(_loaded(tmp_path, "checkpoint-before")[k], v) for k, v in expected.items())
    assert coord.save_checkpoint(checkpoint_id="after", async_save=True, background_staging=True).result(30)


def test_a_change_on_one_rank_while_staging_fails_the_save_on_every_rank(
        tmp_path: Path, held_copy: threading.Event) -> None:
    started = threading.Barrier(2)

    def fn(comm: ThreadComm) -> str:
        box = Box({"w": torch.full((1024,), float(comm.rank)), "n": 3})
        coord = CheckpointCoordinator([StateComponent("s", box, "per_rank")], dist=comm, output_dir=tmp_path)
        handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
        if comm.rank == 1:
            box.state["w"][7] = -1.0
        started.wait(10)
        if comm.rank == 0:
            held_copy.set()
        try:
            handle.result(30)
        except StateChangedError as exc:
            return f"{type(exc).__name__}:{sorted(exc.failures)}:{'w' in str(exc)}"
        return "committed"

    assert all_ok(threads(2, fn)) == ["StateChangedError:[1]:True"] * 2
    assert os.listdir(tmp_path / "checkpoints") == []


def test_members_of_a_balanced_write_staged_in_the_background_save_the_state_of_the_call(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> None:
        box = Box({f"t{i}": torch.full((4096,), float(i)) for i in range(8)})
        coord = CheckpointCoordinator([StateComponent("s", box, "replicated")], dist=comm, output_dir=tmp_path,
                                      min_part_bytes=16 * 1024)
        handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
        handle.wait_staged(20)
        for t in box.state.values():
            t.add_(100.0)  # after staging: not in the checkpoint
        handle.result(30)
        coord.load_checkpoint()
        assert all(torch.equal(box.state[f"t{i}"], torch.full((4096,), float(i))) for i in range(8))

    all_ok(threads(2, fn))
    names = sorted(os.listdir(tmp_path / "checkpoints" / "checkpoint-1" / "s"))
    assert names == [f"replicated.part-00{i}-of-002.safetensors" for i in range(2)]  # one part per member


def test_a_save_staged_in_the_background_beyond_the_memory_budget_streams_and_saves_the_same_state(
        tmp_path: Path) -> None:
    boxes = {k: Box({"w": torch.randn(64 * 1024), "n": i}) for i, k in enumerate("abc")}
    expected = {k: b.state["w"].clone() for k, b in boxes.items()}
    coord = CheckpointCoordinator([StateComponent(k, b, "global") for k, b in boxes.items()], output_dir=tmp_path,
                                  async_snapshot_bytes=300 * 1024)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    handle.wait_staged(30)
    for b in boxes.values():
        b.state["w"].add_(1.0)
    assert handle.result(30)
    assert coord._async.snapshots == {}  # nothing kept beyond the budget
    for b in boxes.values():
        b.state["w"].zero_()
    coord.load_checkpoint()
    assert all(torch.equal(boxes[k].state["w"], v) for k, v in expected.items())


def test_a_copy_that_fails_while_staging_fails_the_save_and_releases_wait_staged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: StateCopy, only: Any = None) -> None:
        raise RuntimeError("host memory exhausted")

    monkeypatch.setattr(StateCopy, "fill", broken)
    coord = _coord(_model(0), tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    handle.wait_staged(20)
    with pytest.raises(Exception, match="host memory exhausted"):
        handle.result(30)
    assert os.listdir(coord.checkpoints_dir) == []


def test_state_made_under_inference_mode_is_copied_before_the_call_returns(tmp_path: Path) -> None:
    with torch.inference_mode():
        box = Box({"w": torch.arange(10.0)})
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    assert handle.staged()  # no version counters to watch: staged before the call returned
    assert handle.result(30)
    box.state = {"w": torch.zeros(10)}
    coord.load_checkpoint()
    assert torch.equal(box.state["w"], torch.arange(10.0))


def test_a_default_async_save_is_staged_when_it_returns_and_background_staging_needs_async_save(
        tmp_path: Path) -> None:
    coord = _coord(_model(0), tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    assert handle.staged()
    handle.wait_staged(0)
    handle.result(30)
    with pytest.raises(ValueError, match="background_staging=True needs async_save=True"):
        coord.save_checkpoint(checkpoint_id="2", background_staging=True)  # type: ignore[call-overload]


def test_a_change_still_running_when_the_copy_ended_is_caught_when_the_trainer_waits_for_staging(
        tmp_path: Path, held_copy: threading.Event) -> None:
    # torch counts an in-place change only once it has finished. Simulated: the bytes change with
    # no count (a NumPy view) before the copy, and the count follows after the copy was checked.
    box = Box({"w": torch.zeros(1024), "v": torch.ones(8)})
    writer = threading.Event()
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path,
                                  phase_hook=lambda phase, rank: writer.wait(20) if phase == "write" else None)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    box.state["w"].numpy()[:512] = 7.0  # the first half of a change that is still running...
    held_copy.set()
    while not handle.staged():
        threading.Event().wait(0.01)
    box.state["w"].add_(0.0)  # ...finishes: now torch counts it
    handle.wait_staged(20)  # the trainer's thread sees the count, before the writer's last file
    writer.set()
    with pytest.raises(StateChangedError, match="entry 'w'"):
        handle.result(30)
    assert os.listdir(coord.checkpoints_dir) == []


def test_changes_after_wait_staged_never_fail_the_save_while_it_is_still_writing(
        tmp_path: Path) -> None:
    box, writer, coord, handle = _staged_with_the_writer_held(tmp_path)
    handle.wait_staged(20)
    box.state["w"].add_(5.0)  # the optimizer step, allowed now; the writer has not written yet
    writer.set()
    assert handle.result(30)
    box.state["w"].zero_().add_(9.0)
    coord.load_checkpoint()
    assert torch.equal(box.state["w"], torch.zeros(1024))


@pytest.mark.parametrize("background", [False, True])
def test_a_streaming_save_whose_write_phase_fails_before_its_first_file_ends_without_hanging(
        tmp_path: Path, background: bool) -> None:
    boxes = {k: Box({"w": torch.randn(64 * 1024)}) for k in "abc"}

    def hook(phase: str, rank: int) -> None:
        if phase == "write":
            raise OSError(28, "No space left on device")

    coord = CheckpointCoordinator([StateComponent(k, b, "global") for k, b in boxes.items()], output_dir=tmp_path,
                                  phase_hook=hook, async_snapshot_bytes=300 * 1024)
    done = threading.Event()
    outcome: list[BaseException] = []

    def save() -> None:
        try:
            coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=background).result(20)
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=save, daemon=True).start()
    assert done.wait(30), "the save hung"
    assert len(outcome) == 1 and "No space left" in str(outcome[0]), outcome
    assert not [t.name for t in threading.enumerate() if t.name.startswith("distckpt-stage")]


def test_result_with_a_timeout_returns_in_time_while_a_failed_saves_copy_is_still_running(
        tmp_path: Path, held_copy: threading.Event) -> None:
    def hook(phase: str, rank: int) -> None:
        if phase == "write":
            raise OSError(28, "No space left on device")

    coord = _coord(_model(0), tmp_path, phase_hook=hook)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    with pytest.raises(TimeoutError):
        handle.result(0.2)
    held_copy.set()
    with pytest.raises(Exception, match="No space left"):
        handle.result(20)


def test_a_staging_thread_that_cannot_start_fails_the_call_and_the_next_save_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(0)
    coord = _coord(model, tmp_path)
    start = threading.Thread.start

    def refuse(self: threading.Thread) -> None:
        if self.name.startswith("distckpt-stage"):
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", refuse)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    monkeypatch.setattr(threading.Thread, "start", start)
    assert coord.save_checkpoint(checkpoint_id="2", async_save=True, background_staging=True).result(30)
    assert sorted(os.listdir(coord.checkpoints_dir)) == ["checkpoint-2"]


def test_a_change_the_writer_saw_fails_the_save_and_wait_staged_does_not_also_call_the_save_torn(
        tmp_path: Path) -> None:
    box, writer, coord, handle = _staged_with_the_writer_held(tmp_path)
    while not handle.staged():
        threading.Event().wait(0.01)
    box.state["w"].add_(1.0)  # copied already, but wait_staged() has not returned: still not allowed
    writer.set()  # the writer looks after its last file, and sees it
    while not handle.done():
        threading.Event().wait(0.01)
    handle.wait_staged(20)  # the writer saw it and failed the save: nothing here to warn about
    with pytest.raises(StateChangedError, match=r"before SaveHandle\.wait_staged"):
        handle.result(30)
    assert os.listdir(coord.checkpoints_dir) == []


def test_after_result_returned_the_trainer_may_change_anything_before_calling_wait_staged(tmp_path: Path) -> None:
    box = Box({"w": torch.zeros(1024)})
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    assert handle.result(30)
    box.state["w"].add_(1.0)
    handle.wait_staged(20)  # nothing left to look at: the save is committed
