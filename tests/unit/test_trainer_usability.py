"""What a trainer author meets (issue 14), on threaded worlds: the resume idiom, state
mismatches named before any byte is read, failures and phase on every collective error,
quiet logs and progress."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distckpt import (
    ArgumentMismatchError,
    CheckpointCoordinator,
    CheckpointNotFoundError,
    ComponentMismatchError,
    StateComponent,
    StateMismatchError,
    TopologyMismatchError,
    progress,
)
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, threads


def coordinator(comm: ThreadComm, out: Path, comps: list[StateComponent], **kw: Any) -> CheckpointCoordinator:
    return CheckpointCoordinator(comps, dist=comm, output_dir=out, **kw)


def model(fan_in: int = 8, fan_out: int = 4, seed: int = 0) -> nn.Linear:
    """A linear layer with values drawn from its own generator (rank threads share the global one)."""
    layer = nn.Linear(fan_in, fan_out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return layer


def save_model(tmp_path: Path, world: int, fan_in: int = 8, fan_out: int = 4) -> None:
    def fn(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", model(fan_in, fan_out), "replicated")]
                           ).save_checkpoint(checkpoint_id="1")

    all_ok(threads(world, fn))


# ------------------------------------------------------------------ the resume idiom


def test_missing_ok_without_a_checkpoint_returns_an_empty_report_on_every_rank(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> Any:
        return coordinator(comm, tmp_path, [StateComponent("m", Box({"w": torch.ones(2)}), "replicated")]
                           ).load_checkpoint(missing_ok=True)

    reports = all_ok(threads(4, fn))
    assert all(r.loaded == () and r.skipped == {} and r.files == {} for r in reports)


def test_missing_ok_with_a_path_where_nothing_exists_returns_an_empty_report(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> Any:
        return coordinator(comm, tmp_path, [StateComponent("m", Box({}), "per_rank")]
                           ).load_checkpoint(tmp_path / "nowhere", missing_ok=True)

    assert all(r.loaded == () for r in all_ok(threads(2, fn)))


def test_without_missing_ok_no_checkpoint_is_an_error_on_every_rank_with_phase_and_failures(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> Any:
        return coordinator(comm, tmp_path, [StateComponent("m", Box({}), "replicated")]).load_checkpoint()

    results = threads(4, fn)
    assert all(type(r) is CheckpointNotFoundError and r.phase == "resolve" and r.failures for r in results)


def test_missing_ok_loads_the_latest_checkpoint_when_there_is_one(tmp_path: Path) -> None:
    save_model(tmp_path, 2)

    def fn(comm: ThreadComm) -> Any:
        live = model(seed=comm.rank + 7)
        report = coordinator(comm, tmp_path, [StateComponent("model", live, "replicated")]
                             ).load_checkpoint(missing_ok=True)
        return report.loaded, torch.equal(live.weight, model().weight)

    assert all_ok(threads(2, fn)) == [(("model",), True)] * 2


def test_ranks_that_pass_different_missing_ok_get_an_argument_mismatch(tmp_path: Path) -> None:
    def fn(comm: ThreadComm) -> Any:
        return coordinator(comm, tmp_path, [StateComponent("m", Box({}), "replicated")]
                           ).load_checkpoint(missing_ok=comm.rank == 0)

    results = threads(2, fn)
    assert all(type(r) is ArgumentMismatchError and "missing_ok" in str(r) for r in results)


# ------------------------------------------------------------------ state mismatches


def test_a_model_of_another_shape_fails_every_rank_naming_entry_and_shapes_before_reading(tmp_path: Path) -> None:
    save_model(tmp_path, 4, fan_in=8)
    before: dict[int, dict[str, torch.Tensor]] = {}

    def fn(comm: ThreadComm) -> Any:
        live = model(fan_in=9, seed=comm.rank + 1)  # weight [4, 9] differs; bias [4] would fit
        before[comm.rank] = {k: v.clone() for k, v in live.state_dict().items()}
        try:
            coordinator(comm, tmp_path, [StateComponent("model", live, "replicated")]).load_checkpoint()
        finally:
            assert all(torch.equal(v, before[comm.rank][k]) for k, v in live.state_dict().items())

    results = threads(4, fn)
    assert all(type(r) is StateMismatchError for r in results), results
    err = results[0]
    assert err.phase == "resolve" and set(err.failures) == {0, 1, 2, 3}
    text = str(err)
    assert "ranks 0-3" in text and "component 'model', entry 'weight': saved shape [4, 8] (float32), " \
        "live shape [4, 9] (float32)" in text
    assert text.count("entry 'weight'") == 1  # one message for four identical ranks
    assert "bias" not in text


def test_a_dtype_that_differs_is_refused_when_strict_and_cast_by_load_state_dict_otherwise(tmp_path: Path) -> None:
    save_model(tmp_path, 1)
    live = model(seed=3).to(torch.bfloat16)
    with pytest.raises(StateMismatchError, match=r"saved dtype float32, live dtype bfloat16"):
        CheckpointCoordinator([StateComponent("model", live, "replicated")], output_dir=tmp_path).load_checkpoint()
    CheckpointCoordinator([StateComponent("model", live, "replicated")], output_dir=tmp_path
                          ).load_checkpoint(strict=False)
    assert torch.equal(live.weight, model().weight.to(torch.bfloat16))


def test_a_model_with_other_parameter_names_is_named_both_ways(tmp_path: Path) -> None:
    save_model(tmp_path, 1)
    live = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(StateMismatchError) as caught:
        CheckpointCoordinator([StateComponent("model", live, "replicated")], output_dir=tmp_path).load_checkpoint()
    assert ("component 'model', entries: live state has ['0.bias', '0.weight'] that the checkpoint lacks "
            "and checkpoint has [bias, weight] that the live state lacks") in str(caught.value)


def test_a_fresh_optimizer_resumes_a_trained_ones_state(tmp_path: Path) -> None:
    trained_model = model()
    trained = torch.optim.AdamW(trained_model.parameters())
    trained_model(torch.ones(2, 8)).sum().backward()
    trained.step()
    CheckpointCoordinator([StateComponent("opt", trained, "replicated")], output_dir=tmp_path).save_checkpoint()
    fresh = torch.optim.AdamW(model().parameters())
    report = CheckpointCoordinator([StateComponent("opt", fresh, "replicated")], output_dir=tmp_path
                                   ).load_checkpoint()
    assert report.loaded == ("opt",)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], trained.state_dict()["state"][0]["exp_avg"])


def test_an_optimizer_whose_parameters_changed_shape_is_named(tmp_path: Path) -> None:
    def stepped(fan_in: int) -> torch.optim.Optimizer:
        m = model(fan_in=fan_in)
        opt = torch.optim.AdamW(m.parameters())
        m(torch.ones(1, fan_in)).sum().backward()
        opt.step()
        return opt

    CheckpointCoordinator([StateComponent("opt", stepped(8), "replicated")], output_dir=tmp_path).save_checkpoint()
    with pytest.raises(StateMismatchError, match=r"entry 'state\.0\.exp_avg': saved shape \[4, 8\]"):
        CheckpointCoordinator([StateComponent("opt", stepped(5), "replicated")], output_dir=tmp_path
                              ).load_checkpoint()


# ------------------------------------------------------------------ failures and phase


@pytest.mark.parametrize(("call", "phase"), [("save", "plan"), ("load", "resolve")])
def test_ranks_declaring_different_components_get_failures_and_phase(tmp_path: Path, call: str, phase: str) -> None:
    def fn(comm: ThreadComm) -> Any:
        comps = [StateComponent("a", Box({"x": 1}), "replicated")]
        if comm.rank == 1:
            comps.append(StateComponent("b", Box({"y": 2}), "replicated"))
        c = coordinator(comm, tmp_path, comps)
        return c.save_checkpoint() if call == "save" else c.load_checkpoint(missing_ok=True)

    results = threads(2, fn)
    assert all(type(r) is ComponentMismatchError for r in results), results
    assert all(r.phase == phase for r in results)
    assert all(r.failures == {1: "declares 'b' which rank 0 does not"} for r in results)


def test_groups_that_are_not_a_partition_get_failures_and_phase(tmp_path: Path) -> None:
    groups = {0: (0, 1), 1: (0, 1), 2: (1, 2), 3: (3,)}

    def fn(comm: ThreadComm) -> Any:
        return coordinator(comm, tmp_path, [StateComponent("a", Box({"x": 1}), "per_group", "dp")],
                           process_groups={"dp": groups[comm.rank]}).save_checkpoint()

    results = threads(4, fn)
    assert all(type(r) is TopologyMismatchError for r in results), results
    assert all(r.phase == "plan" and set(r.failures) == {0, 1, 2, 3} for r in results)
    assert str(results[0]).count("process group 'dp'") == 1


# ------------------------------------------------------------------ logs and progress


def test_info_lines_come_from_rank_0_only_with_rank_and_phase(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")

    def fn(comm: ThreadComm) -> Any:
        c = coordinator(comm, tmp_path, [StateComponent("m", Box({"w": torch.ones(4)}), "per_rank")])
        c.save_checkpoint()
        return c.load_checkpoint().loaded

    all_ok(threads(4, fn))
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 2
    assert info[0].startswith("distckpt[rank 0] commit: saved ") and info[1].startswith("distckpt[rank 0] read: loaded ")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "] commit: saved" in r.getMessage()]
    assert sorted(m[:16] for m in debug) == ["distckpt[rank 1]", "distckpt[rank 2]", "distckpt[rank 3]"]


def test_a_long_save_and_load_report_progress_on_rank_0(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "REPORT_AFTER_S", 0.0)  # every save counts as long
    caplog.set_level(logging.INFO, logger="distckpt")
    state = {"w": torch.zeros(64 * 1024)}
    c = CheckpointCoordinator([StateComponent("m", Box(state), "replicated")], output_dir=tmp_path)
    c.save_checkpoint()
    c.load_checkpoint()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("distckpt[rank 0] write: ") and " of 256.0 KiB" in m and "/s" in m for m in lines), lines
    assert any(m.startswith("distckpt[rank 0] read: ") and "(100%)" in m for m in lines), lines


def test_progress_true_drives_a_bar_through_every_byte_written_and_read(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Any] = []

    class Bar:
        def __init__(self, **kwargs: Any) -> None:
            self.desc, self.total, self.n, self.closed = kwargs["desc"], kwargs["total"], 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=Bar))
    c = CheckpointCoordinator([StateComponent("m", Box({"w": torch.zeros(1000)}), "replicated")],
                              output_dir=tmp_path)
    path = c.save_checkpoint(progress=True)
    c.load_checkpoint(progress=True)
    size = os.path.getsize(os.path.join(path, "m", "replicated.safetensors"))
    assert [(b.desc, b.n, b.closed) for b in bars] == [("distckpt write", size, True), ("distckpt read", size, True)]
    assert bars[0].total == 4000 and bars[1].total == size


def test_a_read_and_broadcast_load_counts_every_byte_on_the_reader_and_on_the_members_it_sent_them_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import all_ok, threads

    meters: list[progress.Progress] = []
    real = progress.Progress

    def kept(phase: str, rank: int, total: Any, **kw: Any) -> progress.Progress:
        meter = real(phase, rank, total, **kw)
        if phase == "read":
            meters.append(meter)
        return meter

    monkeypatch.setattr("distckpt.loading.Progress", kept)

    def fn(comm: Any) -> None:
        c = CheckpointCoordinator([StateComponent("m", Box({"w": torch.full((4096,), 1.0)}), "replicated")],
                                  dist=comm, output_dir=tmp_path, load_strategy="read_and_broadcast")
        c.save_checkpoint(checkpoint_id="1")
        c.load_checkpoint()

    all_ok(threads(2, fn))
    assert sorted(m.rank for m in meters) == [0, 1]
    assert all(m.done == m.total > 16384 for m in meters), [(m.rank, m.done, m.total) for m in meters]
