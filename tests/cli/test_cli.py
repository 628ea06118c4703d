"""The distckpt command line on real checkpoints written in-process (threaded worlds)."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import CheckpointCoordinator, CheckpointManifest, SharingPattern, StateComponent
from distckpt.cli import formatting, main
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, mesh_groups, threads

DIMS = [("dp", 2), ("tp", 2)]


def dp_tp_components(rank: int, scale: float = 1.0) -> list[StateComponent]:
    """A 2 x 2 DP x TP job: model sharded along tp, data shared within tp, one rng per rank."""
    tp = rank % 2
    return [
        StateComponent("model", Box({"w": torch.full((3, 4), tp * scale), "b": torch.arange(3.0),
                                     "opt": {"state": {0: {"exp_avg": torch.full((2,), tp + 0.5)}}}}),
                       "per_group", process_group_name="dp", validate_replication=True),
        StateComponent("dataset", Box({"pos": rank // 2}), "per_group", process_group_name="tp"),
        StateComponent("scheduler", Box({"epoch": 3, "lr": 0.1}), "replicated", validate_replication=True),
        StateComponent("rng", Box({"seed": rank}), "per_rank"),
        StateComponent("trainer", Box({"step": 10}), "global"),
    ]


def save_dp_tp(out: Path, scale: float = 1.0,
               comps: Callable[[int, float], list[StateComponent]] = dp_tp_components) -> str:
    def fn(comm: ThreadComm) -> str:
        return CheckpointCoordinator(comps(comm.rank, scale), process_groups=mesh_groups(comm.rank, DIMS),
                                     dist=comm, output_dir=out).save_checkpoint()

    path: str = all_ok(threads(4, fn, nodes=[0, 0, 1, 1]))[0]
    return path


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """An output directory holding two committed DP x TP checkpoints; the second's tp=1 shard changed."""
    out = tmp_path_factory.mktemp("run")
    first = save_dp_tp(out, 1.0)
    second = save_dp_tp(out, 2.0)
    return out, first, second


@pytest.fixture
def copy_of(tmp_path: Path, two_saves: tuple[Path, str, str]) -> Path:
    """A private copy of the output directory, free to damage."""
    out = tmp_path / "run"
    shutil.copytree(two_saves[0], out)
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------ ls


def test_ls_lists_checkpoints_oldest_to_newest_and_marks_the_latest(capsys: pytest.CaptureFixture[str],
                                                                     two_saves: tuple[Path, str, str]) -> None:
    out = two_saves[0]
    code, stdout, _ = run(capsys, "ls", str(out))
    assert code == 0
    lines = stdout.splitlines()
    i1 = next(i for i, line in enumerate(lines) if "checkpoint-1 " in line)
    i2 = next(i for i, line in enumerate(lines) if "checkpoint-2 " in line)
    assert i1 < i2
    assert "latest" in lines[i2] and lines[i2].lstrip().startswith("*")
    assert "latest" not in lines[i1]


def test_ls_accepts_the_checkpoints_folder_itself_and_offers_json(capsys: pytest.CaptureFixture[str],
                                                                  two_saves: tuple[Path, str, str]) -> None:
    out = two_saves[0]
    code, stdout, _ = run(capsys, "ls", str(out / "checkpoints"), "--json")
    assert code == 0
    listed = json.loads(stdout)["checkpoints"]
    assert [c["name"] for c in listed] == ["checkpoint-1", "checkpoint-2"]
    assert [c["latest"] for c in listed] == [False, True]
    assert listed[1]["world_size"] == 4 and listed[1]["components"] == 5


def test_ls_marks_corrupt_and_incomplete_directories_with_the_reason(capsys: pytest.CaptureFixture[str],
                                                                     copy_of: Path) -> None:
    ckpts = copy_of / "checkpoints"
    (ckpts / "checkpoint-2" / "manifest.json").write_text("{not json")
    (ckpts / ".checkpoint-3.staging-0123456789ab").mkdir()
    (ckpts / "checkpoint-4").mkdir()
    code, stdout, _ = run(capsys, "ls", str(copy_of))
    assert code == 0
    row = {line.split()[0]: line for line in stdout.splitlines() if line.strip()}
    assert "latest" in row["*"] and "checkpoint-1" in row["*"]  # the newest readable one is latest now
    assert "corrupt" in row["checkpoint-2"] and "not valid JSON" in row["checkpoint-2"]
    assert "incomplete" in row[".checkpoint-3.staging-0123456789ab"]
    assert "never committed" in row["checkpoint-4"]


def test_ls_of_an_empty_directory_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, stdout, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0 and "no checkpoints" in stdout


# ------------------------------------------------------------------- inspect


def test_inspect_shows_each_components_pattern_writers_replica_sets_and_the_topology(
        capsys: pytest.CaptureFixture[str], two_saves: tuple[Path, str, str]) -> None:
    _, first, _ = two_saves
    code, stdout, _ = run(capsys, "inspect", first, "--files")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    assert rows["model"][1:6] == ["per_group(dp)", "0,1", "{0,2}", "{1,3}", "2"]
    assert rows["model"][-2:] == ["tensor", "yes"]
    assert rows["dataset"][1:6] == ["per_group(tp)", "0,2", "{0,1}", "{2,3}", "2"]
    assert rows["rng"][1:3] == ["per_rank", "0-3"]
    assert rows["trainer"][1:4] == ["global", "0", "{0-3}"]
    assert "node 0 = ranks 0,1; node 1 = ranks 2,3" in stdout
    assert "model/dp-001.safetensors" in stdout and "xxh3-128:" in stdout


def test_inspect_json_carries_the_whole_manifest(capsys: pytest.CaptureFixture[str],
                                                 two_saves: tuple[Path, str, str]) -> None:
    _, first, _ = two_saves
    code, stdout, _ = run(capsys, "inspect", first, "--json")
    assert code == 0
    doc = json.loads(stdout)
    assert CheckpointManifest.from_dict(doc["manifest"]) == CheckpointManifest.load(first)
    assert doc["manifest"]["components"]["model"]["replicated_across"] == [[0, 2], [1, 3]]


# -------------------------------------------------------------------- verify


def test_verify_passes_an_intact_checkpoint(capsys: pytest.CaptureFixture[str],
                                            two_saves: tuple[Path, str, str]) -> None:
    code, stdout, stderr = run(capsys, "verify", two_saves[1])
    assert code == 0 and stdout.startswith("intact:") and stderr == ""


def test_verify_fails_and_names_the_file_after_one_byte_is_flipped(capsys: pytest.CaptureFixture[str],
                                                                   copy_of: Path) -> None:
    ckpt = copy_of / "checkpoints" / "checkpoint-2"
    flip_last_byte(ckpt / "model" / "dp-001.safetensors")
    code, stdout, _ = run(capsys, "verify", str(ckpt))
    assert code == 1
    bad = [line for line in stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "model/dp-001.safetensors" in bad[0] and "checksum mismatch" in bad[0]
    assert "NOT INTACT" in stdout


def test_verify_reports_missing_resized_and_unlisted_files(capsys: pytest.CaptureFixture[str],
                                                           copy_of: Path) -> None:
    ckpt = copy_of / "checkpoints" / "checkpoint-1"
    (ckpt / "rng" / "rank-00002.safetensors").unlink()
    with open(ckpt / "trainer" / "global.safetensors", "ab") as f:
        f.write(b"\0")
    (ckpt / "rng" / "rank-00009.safetensors").write_bytes(b"stray")
    (ckpt / "notes.txt").write_text("hello")
    code, stdout, _ = run(capsys, "verify", str(ckpt))
    assert code == 1
    assert "MISSING   rng/rank-00002.safetensors" in stdout
    assert "BAD       trainer/global.safetensors: size is" in stdout
    assert "UNLISTED  rng/rank-00009.safetensors" in stdout
    assert "UNLISTED  notes.txt" in stdout


def test_verify_catches_a_manifest_that_contradicts_itself(capsys: pytest.CaptureFixture[str], copy_of: Path) -> None:
    ckpt = copy_of / "checkpoints" / "checkpoint-1"
    raw = json.loads((ckpt / "manifest.json").read_text())
    raw["components"]["rng"]["size_bytes"] += 1
    (ckpt / "manifest.json").write_text(json.dumps(raw))
    code, stdout, _ = run(capsys, "verify", str(ckpt))
    assert code == 1 and "components.rng: size_bytes" in stdout


def test_verify_draws_progress_on_stderr_only_when_it_is_a_terminal(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, two_saves: tuple[Path, str, str]) -> None:
    monkeypatch.setattr(formatting, "_PROGRESS_MIN_BYTES", 0)
    code, _, stderr = run(capsys, "verify", two_saves[1])
    assert code == 0 and stderr == ""  # captured stderr is not a terminal

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["verify", two_saves[1]]) == 0
    assert "verify:" in term.getvalue() and "%" in term.getvalue()


# ---------------------------------------------------------------------- diff


def test_diff_finds_the_changed_tensor_and_its_max_abs_difference(capsys: pytest.CaptureFixture[str],
                                                                  two_saves: tuple[Path, str, str]) -> None:
    _, first, second = two_saves
    code, stdout, _ = run(capsys, "diff", first, second)
    assert code == 1
    assert "component 'model'" in stdout
    assert "model/dp-001.safetensors" in stdout and "model/dp-000.safetensors" not in stdout
    assert "w: max abs difference 1, 12 of 12 elements differ" in stdout
    assert "DIFFERENT: 1 of 5 components differ" in stdout


def test_diff_of_a_checkpoint_with_itself_finds_nothing(capsys: pytest.CaptureFixture[str],
                                                        two_saves: tuple[Path, str, str]) -> None:
    code, stdout, _ = run(capsys, "diff", two_saves[1], two_saves[1])
    assert code == 0 and "same state" in stdout


def test_diff_reports_entries_and_components_present_on_one_side_only(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a = CheckpointCoordinator([StateComponent("m", Box({"w": torch.zeros(2), "k": 1}), "global"),
                               StateComponent("extra", Box({"x": 1}), "global")],
                              output_dir=tmp_path / "a").save_checkpoint()
    b = CheckpointCoordinator([StateComponent("m", Box({"w": torch.zeros(2, dtype=torch.float64), "n": 2}), "global")],
                              output_dir=tmp_path / "b").save_checkpoint()
    code, stdout, _ = run(capsys, "diff", a, b)
    assert code == 1
    assert "component 'extra' (global): only in A" in stdout
    assert "k: only in A" in stdout and "n: only in B" in stdout
    assert "w: torch.float32[2] vs torch.float64[2]" in stdout


def test_diff_refuses_to_compare_a_damaged_file(capsys: pytest.CaptureFixture[str], copy_of: Path,
                                                two_saves: tuple[Path, str, str]) -> None:
    damaged = copy_of / "checkpoints" / "checkpoint-2"
    flip_last_byte(damaged / "rng" / "rank-00001.safetensors")
    code, _, stderr = run(capsys, "diff", str(damaged), two_saves[2])
    assert code == 2 and "rng/rank-00001.safetensors" in stderr and "verify" in stderr


# ------------------------------------------------------------------- convert


def write_legacy(d: Path) -> None:
    """An original-format checkpoint of a 2 x 2 DP x TP job on two nodes."""
    d.mkdir(parents=True)
    for writer in (0, 1):  # tp shards; the dp groups are {0,2} and {1,3}
        torch.save({"w": torch.full((2,), float(writer))}, d / f"model_state_group_dp_grank_0_rank_{writer}.pt")
    for r in range(4):
        torch.save({"seed": r}, d / f"rng_state_rank_{r}.pt")
    torch.save({"step": 9, "history": [0.5, 0.25]}, d / "trainer_state.pt")
    torch.save({"epoch": 2}, d / "scheduler_state.pt")
    for node, writer in ((0, 0), (1, 2)):
        torch.save({"cache": torch.tensor([node])}, d / f"cache_state_node_{node}_rank_{writer}.pt")
    (d / "checkpoint_manifest.json").write_text(json.dumps(
        {"world_size": 4, "components": {"scheduler": {"sharing_pattern": "replicated"}}}))


def legacy_components(rank: int) -> list[StateComponent]:
    return [
        StateComponent("model", Box(), "per_group", process_group_name="dp"),
        StateComponent("rng", Box(), "per_rank"),
        StateComponent("trainer", Box(), "global"),
        StateComponent("scheduler", Box(), "replicated"),
        StateComponent("cache", Box(), "per_node"),
    ]


def test_convert_rewrites_a_legacy_checkpoint_that_then_loads_on_every_rank(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "old" / "checkpoint-500"
    write_legacy(src)
    dst = tmp_path / "new" / "checkpoints" / "checkpoint-500"
    code, _, stderr = run(capsys, "convert", str(src), str(dst), "--mesh", "dp=2,tp=2", "--nproc-per-node", "2")
    assert code == 0, stderr
    m = CheckpointManifest.load(dst)
    assert m.checkpoint_id == "500" and m.world_size == 4
    assert m.components["model"].replicated_across == ((0, 2), (1, 3))
    assert m.components["scheduler"].sharing_pattern is SharingPattern.REPLICATED  # from the legacy manifest
    assert m.components["trainer"].sharing_pattern is SharingPattern.GLOBAL
    assert run(capsys, "verify", str(dst))[0] == 0

    def load(comm: ThreadComm) -> dict[str, Any]:
        comps = legacy_components(comm.rank)
        CheckpointCoordinator(comps, process_groups=mesh_groups(comm.rank, DIMS), dist=comm,
                              output_dir=tmp_path / "new").load_checkpoint()
        return {c.key: c.stateful.state for c in comps}  # type: ignore[attr-defined]

    states = all_ok(threads(4, load, nodes=[0, 0, 1, 1]))
    for rank, state in enumerate(states):
        assert torch.equal(state["model"]["w"], torch.full((2,), float(rank % 2)))
        assert state["rng"] == {"seed": rank}
        assert state["trainer"] == {"step": 9, "history": [0.5, 0.25]}
        assert state["scheduler"] == {"epoch": 2}
        assert torch.equal(state["cache"]["cache"], torch.tensor([rank // 2]))


def test_convert_asks_for_the_group_layout_that_legacy_names_do_not_record(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-500"
    write_legacy(src)
    code, _, stderr = run(capsys, "convert", str(src), str(tmp_path / "out"), "--nproc-per-node", "2")
    assert code == 2 and "per_group(dp)" in stderr and "--mesh dp=" in stderr
    code, _, stderr = run(capsys, "convert", str(src), str(tmp_path / "out"), "--mesh", "dp=2,tp=2")
    assert code == 2 and "per_node" in stderr and "--nproc-per-node" in stderr
    code, _, stderr = run(capsys, "convert", str(src), str(tmp_path / "out"), "--group", "dp=0,1/2,3",
                          "--nproc-per-node", "2")
    assert code == 2 and "several legacy files for replica set {0,1}" in stderr
    assert not (tmp_path / "out").exists()


def test_convert_refuses_a_pickle_that_weights_only_loading_rejects_and_leaves_nothing(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    src = tmp_path / "checkpoint-1"
    src.mkdir()
    with open(src / "model_state.pt", "wb") as f:
        pickle.dump(Evil(), f, protocol=2)
    code, _, stderr = run(capsys, "convert", str(src), str(tmp_path / "ckpts" / "checkpoint-1"), "--world-size", "1")
    assert code == 2 and "weights_only=True" in stderr
    assert not (tmp_path / "pwned").exists()
    assert os.listdir(tmp_path / "ckpts") == []


def test_convert_to_torch_exports_what_one_rank_would_load(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           two_saves: tuple[Path, str, str]) -> None:
    target = tmp_path / "rank3.pt"
    code, _, stderr = run(capsys, "convert", "--to-torch", str(target), "--rank", "3", two_saves[2])
    assert code == 0, stderr
    state = torch.load(target, weights_only=True)
    assert sorted(state) == ["dataset", "model", "rng", "scheduler", "trainer"]
    assert torch.equal(state["model"]["w"], torch.full((3, 4), 2.0))  # rank 3 holds the tp=1 shard
    assert state["dataset"] == {"pos": 1} and state["rng"] == {"seed": 3} and state["trainer"] == {"step": 10}
    assert run(capsys, "convert", "--to-torch", str(target), "--rank", "3", two_saves[2])[0] == 2  # no overwrite
    code, _, stderr = run(capsys, "convert", "--to-torch", str(tmp_path / "x.pt"), "--rank", "4", two_saves[2])
    assert code == 2 and "world of 4 ranks" in stderr


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("argv", [["ls"], ["inspect"], ["verify"], ["diff", "{ok}"], ["convert", "--to-torch", "{tmp}/x.pt", "--rank", "0"]])
def test_every_subcommand_names_a_missing_path_and_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                           two_saves: tuple[Path, str, str], argv: list[str]) -> None:
    args = [a.format(ok=two_saves[1], tmp=tmp_path) for a in argv] + [str(tmp_path / "nowhere")]
    code, _, stderr = run(capsys, *args)
    assert code == 2 and "nowhere" in stderr and "no such" in stderr


@pytest.mark.parametrize("command", ["inspect", "verify", "diff"])
def test_a_directory_that_is_not_a_checkpoint_or_has_a_corrupt_manifest_exits_2(
        capsys: pytest.CaptureFixture[str], command: str, copy_of: Path) -> None:
    extra = [str(copy_of / "checkpoints" / "checkpoint-1")] if command == "diff" else []
    code, _, stderr = run(capsys, command, *extra, str(copy_of))
    assert code == 2 and "distckpt ls" in stderr  # an output dir: told to list it instead
    plain = copy_of / "empty"
    plain.mkdir()
    code, _, stderr = run(capsys, command, *extra, str(plain))
    assert code == 2 and "not a distckpt checkpoint" in stderr
    broken = copy_of / "checkpoints" / "checkpoint-2"
    (broken / "manifest.json").write_text('{"format": "distckpt", "format_version": "9.0"}')
    code, _, stderr = run(capsys, command, *extra, str(broken))
    assert code == 2 and "corrupt or unreadable manifest" in stderr and "9.0" in stderr


def test_a_legacy_checkpoint_is_pointed_to_convert(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "checkpoint-500"
    write_legacy(src)
    code, _, stderr = run(capsys, "verify", str(src))
    assert code == 2 and "distckpt convert" in stderr
    code, stdout, _ = run(capsys, "inspect", str(src))
    assert code == 0 and "model_state_group_dp_grank_0_rank_1.pt" in stdout
    code, stdout, _ = run(capsys, "ls", str(tmp_path))
    assert code == 0 and "legacy" in stdout


def test_a_usage_error_exits_2_and_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert "verify" in capsys.readouterr().out


def test_the_cli_leaves_the_library_logger_as_it_found_it(capsys: pytest.CaptureFixture[str],
                                                          two_saves: tuple[Path, str, str]) -> None:
    logger = logging.getLogger("distckpt")
    before = (logger.level, logger.propagate, list(logger.handlers))
    assert main(["-v", "inspect", two_saves[1]]) == 0
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_python_dash_m_distckpt_runs_the_same_command_line(two_saves: tuple[Path, str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "distckpt", "verify", two_saves[1]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("intact:")
