"""Coordinator behaviour on threaded worlds: real files, real protocol, no processes."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointExistsError,
    CheckpointManifest,
    CheckpointNotFoundError,
    ComponentMismatchError,
    CrossRankError,
    IntegrityError,
    ReplicationMismatchError,
    SharingPattern,
    StateComponent,
    TopologyMismatchError,
)
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, mesh_groups, threads


def coordinator(comm: ThreadComm, out: Path, comps: list[StateComponent], **kw: Any) -> CheckpointCoordinator:
    groups = kw.pop("groups", None)
    return CheckpointCoordinator(comps, process_groups=groups, dist=comm, output_dir=out, **kw)


def test_single_process_round_trip_restores_model_and_optimizer(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = CheckpointCoordinator([StateComponent("model", model, "global"),
                                  StateComponent("optimizer", opt, "global")], output_dir=tmp_path).save_checkpoint()
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    report = CheckpointCoordinator([StateComponent("model", model2, "global"),
                                    StateComponent("optimizer", opt2, "global")], output_dir=tmp_path).load_checkpoint()
    assert report.loaded == ("model", "optimizer") and report.path == path
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True))
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert opt2.param_groups[0]["lr"] == 0.01


def test_a_required_component_failing_on_one_rank_fails_every_rank(tmp_path: Path) -> None:
    class Broken(Box):
        def state_dict(self) -> Any:
            raise RuntimeError("disk on fire")

    def fn(comm: ThreadComm) -> str:
        box = Broken() if comm.rank == 2 else Box({"x": 1})
        return coordinator(comm, tmp_path, [StateComponent("state", box, "per_rank")]).save_checkpoint()

    results = threads(4, fn)
    assert all(isinstance(r, CrossRankError) for r in results)
    assert all(r.failures == {2: "RuntimeError: disk on fire"} for r in results)
    assert all(r.phase == "write" for r in results)
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("phase", ["plan", "validate", "write", "commit"])
def test_an_exception_in_any_phase_on_any_rank_fails_every_rank_and_commits_nothing(tmp_path: Path, phase: str) -> None:
    def fn(comm: ThreadComm, fail: bool) -> str:
        def hook(p: str, rank: int) -> None:
            if fail and p == phase and rank == 3:
                raise ValueError(f"injected in {p}")
        comps = [StateComponent("m", Box({"w": torch.ones(3)}), "replicated", validate_replication=True)]
        return coordinator(comm, tmp_path, comps, phase_hook=hook).save_checkpoint(checkpoint_id="x" if fail else None)

    first = all_ok(threads(4, lambda c: fn(c, False)))[0]
    results = threads(4, lambda c: fn(c, True))
    assert all(isinstance(r, CrossRankError) and r.failures == {3: f"ValueError: injected in {phase}"} for r in results)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [os.path.basename(first)]


def test_dp_x_tp_declares_one_file_per_shard_and_loads_each_rank_its_own(tmp_path: Path) -> None:
    dims = [("dp", 2), ("tp", 4)]

    def comps(rank: int) -> list[StateComponent]:
        tp = rank % 4
        return [
            StateComponent("model", Box({"w": torch.full((3,), float(tp)), "opt": {"state": {0: {"exp_avg": torch.full((2,), tp + 0.5)}}}}),
                           "per_group", process_group_name="dp", validate_replication=True),
            StateComponent("dataset", Box({"pos": rank // 4}), "per_group", process_group_name="tp"),
            StateComponent("scheduler", Box({"epoch": 3}), "replicated", validate_replication=True),
            StateComponent("rng", Box({"seed": rank}), "per_rank"),
        ]

    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, comps(comm.rank), groups=mesh_groups(comm.rank, dims)).save_checkpoint()

    path = all_ok(threads(8, save, nodes=[0] * 4 + [1] * 4))[0]
    m = CheckpointManifest.load(path)
    assert m.components["model"].ranks == (0, 1, 2, 3)
    assert m.components["dataset"].ranks == (0, 4)
    assert m.components["scheduler"].ranks == (0,)
    assert m.components["rng"].ranks == tuple(range(8))
    assert m.topology["nodes"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for c in m.components.values():
        for f in c.files:
            assert os.path.getsize(os.path.join(path, f.path)) == f.size_bytes
        assert c.size_bytes == sum(f.size_bytes for f in c.files)

    def load(comm: ThreadComm) -> bool:
        fresh = comps(comm.rank)
        for c in fresh:
            c.stateful.state = None  # type: ignore[attr-defined]
        coordinator(comm, tmp_path, fresh, groups=mesh_groups(comm.rank, dims)).load_checkpoint()
        return all(repr(a.stateful.state) == repr(b.stateful.state)  # type: ignore[attr-defined]
                   for a, b in zip(fresh, comps(comm.rank), strict=True))

    assert all_ok(threads(8, load, nodes=[0] * 4 + [1] * 4)) == [True] * 8


def test_a_wrong_per_group_declaration_is_caught_by_validation_not_silently_dropped(tmp_path: Path) -> None:
    dims = [("dp", 2), ("tp", 2)]

    def save(comm: ThreadComm) -> str:
        shard = Box({"w": torch.full((2,), float(comm.rank % 2))})
        comps = [StateComponent("model", shard, "per_group", process_group_name="tp", validate_replication=True)]
        return coordinator(comm, tmp_path, comps, groups=mesh_groups(comm.rank, dims)).save_checkpoint()

    results = threads(4, save)
    assert all(isinstance(r, ReplicationMismatchError) for r in results)
    assert {str(r) for r in results} == {str(results[0])}
    assert not os.listdir(tmp_path / "checkpoints")


def test_validation_compares_sets_that_do_not_contain_rank_0(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        w = torch.zeros(5)
        if comm.rank == 5:
            w[4] = 1
        comps = [StateComponent("model", Box({"state": {0: {"exp_avg": w.bfloat16()}}}), "per_group",
                                process_group_name="dp", validate_replication=True, validation_level="full")]
        return coordinator(comm, tmp_path, comps, groups=mesh_groups(comm.rank, [("dp", 2), ("tp", 4)])).save_checkpoint()

    results = threads(8, save)
    assert all(isinstance(r, ReplicationMismatchError) for r in results)
    text = str(results[0])
    assert "[1] | [5]" in text and "state.0.exp_avg" in text and "max abs difference 1, 1 of 5" in text
    assert all(r.failures == {5: results[0].failures[5]} for r in results)


def test_ranks_declaring_different_components_get_a_per_rank_difference(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> str:
        pattern = SharingPattern.PER_RANK if comm.rank == 1 else SharingPattern.REPLICATED
        comps = [StateComponent("m", Box({"x": 1}), pattern)]
        if comm.rank == 2:
            comps.append(StateComponent("extra", Box({}), "global"))
        return coordinator(comm, tmp_path, comps).save_checkpoint()

    results = threads(3, fn)
    assert all(isinstance(r, ComponentMismatchError) for r in results)
    assert set(results[0].failures) == {1, 2}
    assert "per_rank" in results[0].failures[1] and "'extra'" in results[0].failures[2]


def test_per_rank_state_does_not_load_into_another_world_size(tmp_path: Path) -> None:
    all_ok(threads(4, lambda c: coordinator(c, tmp_path, [StateComponent("rng", Box({"r": c.rank}), "per_rank")]).save_checkpoint()))
    results = threads(2, lambda c: coordinator(c, tmp_path, [StateComponent("rng", Box(), "per_rank")]).load_checkpoint())
    assert all(isinstance(r, TopologyMismatchError) for r in results)
    assert "world 4" in str(results[0]) and "world 2" in str(results[0])


def test_global_and_replicated_state_loads_into_any_world_size(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box({"w": torch.arange(3.0)}), "replicated"),
                                            StateComponent("trainer", Box({"step": 7}), "global")]).save_checkpoint()

    all_ok(threads(4, save))

    def load(comm: ThreadComm) -> Any:
        boxes = [Box(), Box()]
        coordinator(comm, tmp_path, [StateComponent("model", boxes[0], "replicated"),
                                     StateComponent("trainer", boxes[1], "global")]).load_checkpoint()
        return boxes[1].state["step"], boxes[0].state["w"].tolist()

    assert all_ok(threads(2, load)) == [(7, [0.0, 1.0, 2.0])] * 2
    assert all_ok(threads(6, load)) == [(7, [0.0, 1.0, 2.0])] * 6


def test_a_changed_pattern_is_refused_at_load(tmp_path: Path) -> None:
    all_ok(threads(2, lambda c: coordinator(c, tmp_path, [StateComponent("m", Box({"x": 1}), "replicated")]).save_checkpoint()))
    results = threads(2, lambda c: coordinator(c, tmp_path, [StateComponent("m", Box(), "global")]).load_checkpoint())
    assert all(isinstance(r, ComponentMismatchError) and "saved as replicated" in str(r) for r in results)


def test_optional_components_are_skipped_and_strict_rejects_undeclared_ones(tmp_path: Path) -> None:
    CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global"), StateComponent("b", Box({"y": 2}), "global")],
                          output_dir=tmp_path).save_checkpoint()
    with pytest.raises(ComponentMismatchError, match="nobody declared"):
        CheckpointCoordinator([StateComponent("a", Box(), "global")], output_dir=tmp_path).load_checkpoint()
    report = CheckpointCoordinator([StateComponent("a", Box(), "global"), StateComponent("c", Box(), "global", required=False)],
                                   output_dir=tmp_path).load_checkpoint(strict=False)
    assert report.loaded == ("a",) and set(report.skipped) == {"b", "c"}
    with pytest.raises(ComponentMismatchError, match="required component 'c'"):
        CheckpointCoordinator([StateComponent("a", Box(), "global"), StateComponent("c", Box(), "global")],
                              output_dir=tmp_path).load_checkpoint(strict=False)


def test_latest_is_chosen_by_sequence_never_by_mtime(tmp_path: Path) -> None:
    c = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], output_dir=tmp_path)
    first = c.save_checkpoint(checkpoint_id="zzz")
    second = c.save_checkpoint(checkpoint_id="aaa")
    os.utime(first, (time.time() + 1000, time.time() + 1000))
    (Path(c.checkpoints_dir) / ".checkpoint-bbb.staging-123").mkdir()
    (Path(c.checkpoints_dir) / "checkpoint-broken").mkdir()
    assert c.latest_checkpoint() == second


def test_an_existing_checkpoint_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    box = Box({"v": 1})
    c = CheckpointCoordinator([StateComponent("a", box, "global")], output_dir=tmp_path)
    path = c.save_checkpoint(checkpoint_id="5")
    box.state = {"v": 2}
    with pytest.raises(CheckpointExistsError):
        c.save_checkpoint(checkpoint_id="5")
    out = Box()
    CheckpointCoordinator([StateComponent("a", out, "global")], output_dir=tmp_path).load_checkpoint(path)
    assert out.state == {"v": 1}
    c.save_checkpoint(checkpoint_id="5", overwrite=True)
    CheckpointCoordinator([StateComponent("a", out, "global")], output_dir=tmp_path).load_checkpoint(path)
    assert out.state == {"v": 2}
    assert sorted(os.listdir(c.checkpoints_dir)) == ["checkpoint-5"]


def test_stale_staging_directories_are_cleaned_by_the_next_save(tmp_path: Path) -> None:
    c = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], output_dir=tmp_path)
    c.save_checkpoint()
    stale = Path(c.checkpoints_dir) / ".checkpoint-2.staging-dead"
    (stale / "a").mkdir(parents=True)
    c.save_checkpoint()
    assert sorted(os.listdir(c.checkpoints_dir)) == ["checkpoint-1", "checkpoint-2"]


def test_retention_keeps_the_newest_and_survives_a_failing_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distckpt import storage

    c = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], output_dir=tmp_path, keep_last=2)
    for _ in range(4):
        c.save_checkpoint()
    assert sorted(os.listdir(c.checkpoints_dir)) == ["checkpoint-3", "checkpoint-4"]

    def refuse(path: str) -> None:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage, "remove_checkpoint", refuse)
    assert c.save_checkpoint().endswith("checkpoint-5")
    assert sorted(os.listdir(c.checkpoints_dir)) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]


def test_loading_with_nothing_committed_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        CheckpointCoordinator([StateComponent("a", Box(), "global")], output_dir=tmp_path).load_checkpoint()


def test_a_corrupt_file_names_itself_on_every_rank(tmp_path: Path) -> None:
    path = all_ok(threads(2, lambda c: coordinator(c, tmp_path, [StateComponent("m", Box({"w": torch.ones(100)}), "per_rank")]).save_checkpoint()))[0]
    target = Path(path) / "m" / "rank-00001.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    results = threads(2, lambda c: coordinator(c, tmp_path, [StateComponent("m", Box(), "per_rank")]).load_checkpoint())
    assert all(isinstance(r, IntegrityError) and set(r.failures) == {1} for r in results)
    assert "rank-00001.safetensors" in str(results[0]) and "checksum" in str(results[0])


def test_legacy_checkpoints_load_read_only_per_group_from_the_right_file(tmp_path: Path) -> None:
    legacy = tmp_path / "checkpoint-500"
    legacy.mkdir()
    torch.save({"w": torch.tensor([1.0])}, legacy / "model_state_group_dp_grank_0_rank_0.pt")
    torch.save({"w": torch.tensor([2.0])}, legacy / "model_state_group_dp_grank_0_rank_1.pt")
    torch.save({"step": 9}, legacy / "trainer_state.pt")
    for r in range(4):
        torch.save({"r": r}, legacy / f"rng_state_rank_{r}.pt")

    def load(comm: ThreadComm) -> Any:
        boxes = [Box(), Box(), Box()]
        comps = [StateComponent("model", boxes[0], "per_group", process_group_name="dp"),
                 StateComponent("trainer", boxes[1], "global"), StateComponent("rng", boxes[2], "per_rank")]
        report = coordinator(comm, tmp_path, comps, groups=mesh_groups(comm.rank, [("dp", 2), ("tp", 2)])).load_checkpoint(legacy)
        assert report.legacy
        return boxes[0].state["w"].item(), boxes[1].state["step"], boxes[2].state["r"]

    assert all_ok(threads(4, load)) == [(1.0, 9, 0), (2.0, 9, 1), (1.0, 9, 2), (2.0, 9, 3)]


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


def test_a_malicious_legacy_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    legacy = tmp_path / "checkpoint-1"
    legacy.mkdir()
    _Evil.marker = str(tmp_path / "pwned")
    with open(legacy / "model_state.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    # torch's weights_only unpickler warns about the pickle's protocol before refusing it: expected here
    with pytest.raises(IntegrityError, match="weights_only=True"), pytest.warns(UserWarning, match="pickle protocol"):
        CheckpointCoordinator([StateComponent("model", Box(), "global")], output_dir=tmp_path).load_checkpoint(legacy)
    assert not (tmp_path / "pwned").exists()


def test_group_names_that_differ_only_in_case_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ignoring case"):
        CheckpointCoordinator([StateComponent("a", Box(), "global")], process_groups={"dp": (0,), "DP": (0,)},
                              output_dir=tmp_path)


class _Counting:
    """Wraps a ThreadComm and records every collective and its payload."""

    def __init__(self, inner: ThreadComm, log: list[tuple[str, str, Any]]) -> None:
        self.inner, self.log = inner, log
        self.rank, self.world_size = inner.rank, inner.world_size

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        self.log.append(("all_gather", phase, obj))
        return self.inner.all_gather(obj, phase)

    def broadcast(self, obj: Any, phase: str) -> Any:
        self.log.append(("broadcast", phase, obj))
        return self.inner.broadcast(obj, phase)

    def group_members(self, group: Any) -> tuple[int, ...]:
        return self.inner.group_members(group)

    def node_id(self) -> str:
        return self.inner.node_id()


@pytest.mark.parametrize("count", [1, 50])
def test_collectives_per_save_and_load_do_not_grow_with_components(tmp_path: Path, count: int) -> None:
    logs: list[list[tuple[str, str, Any]]] = [[], []]

    def fn(comm: ThreadComm) -> None:
        counting = _Counting(comm, logs[comm.rank])
        comps = [StateComponent(f"c{i}", Box({"w": torch.ones(100)}), "replicated", validate_replication=True)
                 for i in range(count)]
        coord = CheckpointCoordinator(comps, dist=counting, output_dir=tmp_path)
        coord.save_checkpoint()
        coord.load_checkpoint()

    all_ok(threads(2, fn))
    kinds = [(kind, phase) for kind, phase, _ in logs[0]]
    assert kinds == [("all_gather", "plan"), ("all_gather", "plan"), ("all_gather", "validate"),
                     ("all_gather", "write"),
                     ("all_gather", "commit"), ("broadcast", "commit"),
                     ("all_gather", "resolve"), ("broadcast", "resolve"), ("all_gather", "resolve"),
                     ("all_gather", "read")]
    assert str(tmp_path) not in repr(logs[0][0][2])  # the call's arguments travel as a digest
    validate_payload = logs[1][2][2][1]
    assert len(validate_payload) == count and all(len(d) == len("xxh3-64:") + 16 for d in validate_payload.values())


def test_a_strict_load_refuses_files_the_manifest_does_not_list(tmp_path: Path) -> None:
    path = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], output_dir=tmp_path).save_checkpoint()
    (Path(path) / "a" / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"stray\.safetensors"):
        CheckpointCoordinator([StateComponent("a", Box(), "global")], output_dir=tmp_path).load_checkpoint()
    report = CheckpointCoordinator([StateComponent("a", Box(), "global")], output_dir=tmp_path).load_checkpoint(strict=False)
    assert report.unlisted == ("a/stray.safetensors",)
