"""State that changes while it is being saved: never a checkpoint that fails its own checksum,
never a balanced write assembled from replicas that disagree (issue 11, item 4).

A synchronous save reads the live tensors. Whatever another thread does to them
meanwhile, the committed file's checksum is the checksum of the bytes in the
file. The parts of a balanced write come from several members; when one of them
holds other values than the rest (changed after validation, or never
validated), the save fails on every rank and nothing commits.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import CheckpointCoordinator, ReplicationMismatchError, StateComponent
from distckpt.cli import main as cli_main
from distckpt.testing import ThreadComm
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.helpers import Box, all_ok, threads

pytestmark = pytest.mark.timeout(120)

NODES = [0, 0, 1, 1]  # 2 nodes x 2 ranks: a replicated set of 4 is written as 2 parts, by ranks 0 and 2
PART = 4096


def _load(out: str, like: dict[str, Any]) -> dict[str, Any]:
    box = Box({k: torch.zeros_like(v) for k, v in like.items()})
    CheckpointCoordinator([StateComponent("model", box, "global")], output_dir=out).load_checkpoint()
    return dict(box.state)


# ------------------------------------------------------ the bytes hashed are the bytes written

def test_a_tensor_changed_just_after_the_kernel_took_its_bytes_still_gives_a_checkpoint_that_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic: the tensor changes right after every write system call of the save."""
    weight = torch.arange(1000, dtype=torch.float32)
    original = weight.clone()
    real_writev = os.writev

    def writev_then_train(fd: int, buffers: Any) -> int:
        n = real_writev(fd, buffers)
        weight.add_(1)  # "another thread": the step after the bytes went to the kernel
        return n

    monkeypatch.setattr(os, "writev", writev_then_train)
    coordinator = CheckpointCoordinator([StateComponent("model", Box({"w": weight}), "global")],
                                        output_dir=tmp_path)
    path = coordinator.save_checkpoint()
    monkeypatch.setattr(os, "writev", real_writev)

    assert cli_main(["verify", path]) == 0
    assert torch.equal(_load(str(tmp_path), {"w": weight})["w"], original)


def test_a_tensor_changed_by_another_thread_during_a_synchronous_save_gives_checkpoints_that_verify(
        tmp_path: Path) -> None:
    weight = torch.zeros(4 * 1024 * 1024)  # 16 MiB: several bounce buffers, the hash runs in its thread
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            weight.add_(1)

    coordinator = CheckpointCoordinator([StateComponent("model", Box({"w": weight}), "global")],
                                        output_dir=tmp_path)
    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()
    try:
        paths = [coordinator.save_checkpoint() for _ in range(3)]
    finally:
        stop.set()
        trainer.join()
    for path in paths:
        assert cli_main(["verify", path]) == 0, path
    _load(str(tmp_path), {"w": weight})  # latest loads: its checksum holds


def test_an_asynchronous_save_writes_its_own_snapshot_which_verifies_while_training_goes_on(tmp_path: Path) -> None:
    """Snapshots skip the bounce copy (they are private): training must still not reach the file."""
    weight = torch.zeros(4 * 1024 * 1024)
    stop = threading.Event()
    coordinator = CheckpointCoordinator([StateComponent("model", Box({"w": weight}), "global")],
                                        output_dir=tmp_path)
    trainer = threading.Thread(target=lambda: [weight.add_(1) for _ in iter(stop.is_set, True)], daemon=True)
    trainer.start()
    try:
        handles = [coordinator.save_checkpoint(async_save=True) for _ in range(2)]
        paths = [h.result() for h in handles]
    finally:
        stop.set()
        trainer.join()
    for path in paths:
        assert cli_main(["verify", path]) == 0, path


# ------------------------------------------------------ balanced writes come from one state

def _balanced_save(tmp_path: Path, change: Any, validate: bool) -> list[Any]:
    """Every rank saves ``{"a": 1.0s, "b": 1.0s}`` as a 2-part balanced write; ``change(rank, state, phase)``
    may alter one rank's replica at the start of any phase."""
    def save(comm: ThreadComm) -> str:
        state = {"a": torch.ones(1024), "b": torch.ones(1024)}  # a lands in part 0, b in part 1

        def hook(phase: str, rank: int) -> None:
            change(rank, state, phase)

        coordinator = CheckpointCoordinator([StateComponent("model", Box(state), "replicated")], dist=comm,
                                            output_dir=tmp_path, min_part_bytes=PART, phase_hook=hook)
        return coordinator.save_checkpoint(validate=validate)

    return threads(4, save, nodes=NODES)


def _part_writer_changes(rank: int, state: dict[str, Any], phase: str) -> None:
    if rank == 2 and phase == "write":  # after validation agreed
        state["b"].fill_(99.0)


def test_a_replica_changed_after_validation_fails_the_balanced_save_on_every_rank_and_commits_nothing(
        tmp_path: Path) -> None:
    results = _balanced_save(tmp_path, _part_writer_changes, validate=True)
    assert all(type(r) is ReplicationMismatchError for r in results), results
    assert all(r.phase == "write" and set(r.failures) == {2} for r in results), results
    assert len({str(r) for r in results}) == 1
    assert "part 1" in str(results[0]) and "rank 0" in str(results[0])
    assert os.listdir(tmp_path / "checkpoints") == []


def test_replicas_that_differ_without_validation_fail_the_balanced_save_and_keep_the_previous_checkpoint(
        tmp_path: Path) -> None:
    good = all_ok(_balanced_save(tmp_path, lambda rank, state, phase: None, validate=False))[0]

    def differ(rank: int, state: dict[str, Any], phase: str) -> None:
        if rank == 2 and phase == "plan":
            state["b"].fill_(99.0)

    results = _balanced_save(tmp_path, differ, validate=False)
    assert all(type(r) is ReplicationMismatchError and set(r.failures) == {2} for r in results), results
    assert os.listdir(tmp_path / "checkpoints") == [os.path.basename(good)]
    loaded = _load_replicated(tmp_path)
    assert torch.equal(loaded["a"], torch.ones(1024)) and torch.equal(loaded["b"], torch.ones(1024))


def _load_replicated(tmp_path: Path) -> dict[str, Any]:
    box = Box({"a": torch.zeros(1024), "b": torch.zeros(1024)})
    CheckpointCoordinator([StateComponent("model", box, "replicated")], output_dir=tmp_path).load_checkpoint()
    return dict(box.state)


# ------------------------------------------------------ the same on real gloo processes

def save_with_a_late_change(ctx: Any, out: str) -> dict[str, Any]:
    """Rank function: a 2-part balanced save where rank 2's replica changes after validation."""
    from distckpt import CheckpointError

    state = {"a": torch.ones(1024), "b": torch.ones(1024)}

    def hook(phase: str, rank: int) -> None:
        _part_writer_changes(rank, state, phase)

    coordinator = CheckpointCoordinator([StateComponent("model", Box(state), "replicated")], output_dir=out,
                                        min_part_bytes=PART, phase_hook=hook, timeout=30.0)
    try:
        return {"path": coordinator.save_checkpoint(validate=True)}
    except CheckpointError as exc:
        return {"error": type(exc).__name__, "failures": sorted(exc.failures), "phase": exc.phase}


@pytest.mark.multirank
def test_on_gloo_a_replica_changed_after_validation_fails_the_balanced_save_on_every_rank(
        world_pool: WorldPool, tmp_path: Path) -> None:
    outcomes = world_pool.run(WorldSpec(nodes=2, procs_per_node=2), save_with_a_late_change, str(tmp_path),
                              timeout=90)
    assert all(o.ok for o in outcomes), [o.describe() for o in outcomes]
    expected = {"error": "ReplicationMismatchError", "failures": [2], "phase": "write"}
    assert [o.value for o in outcomes] == [expected] * 4
    assert os.listdir(tmp_path / "checkpoints") == []
