"""The runner notices what falls short, and ``python -m harness`` reports it in its exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distckpt.testing.pool import WorldPool
from harness.__main__ import main
from harness.runner import run_scenario
from harness.scenario import Scenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
SINGLE = """
trainer = "single"
[topology]
procs_per_node = 1
[run]
steps = 4
save_at = 2
[components]
model = { pattern = "global" }
optimizer = { pattern = "global" }
scheduler = { pattern = "global" }
dataset = { pattern = "global" }
"""


def _scenario(tmp_path: Path, name: str, text: str) -> Scenario:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_scenario(path)


@pytest.mark.timeout(120)
def test_a_resume_that_forgets_the_generators_is_not_bit_exact(
    world_pool: WorldPool, tmp_path: Path
) -> None:
    scenario = _scenario(tmp_path, "forgetful", SINGLE)
    result = run_scenario(world_pool, scenario)
    assert result.bit_exact is False and not result.met
    assert any("rng differs" in p for p in result.problems), result.problems


@pytest.mark.timeout(120)
def test_an_expected_error_that_does_not_happen_falls_short(
    world_pool: WorldPool, tmp_path: Path
) -> None:
    text = """
trainer = "ddp"
[topology]
procs_per_node = 2
[run]
steps = 2
save_at = 1
[components]
model = { pattern = "replicated", validate = true }
[expect]
outcome = "error"
error = "ReplicationMismatchError"
stage = "save"
"""
    result = run_scenario(world_pool, _scenario(tmp_path, "hopeful", text))
    assert not result.met
    assert "raised nothing" in " ".join(result.problems)


@pytest.mark.timeout(180)
def test_the_main_job_keeps_checkpoints_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "results.json"
    status = main(
        [
            "run",
            str(REPO / "scenarios" / "single.toml"),
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert "single" in out and "1 scenarios: 1 met" in out
    checkpoint = tmp_path / "w" / "single" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "manifest.json").is_file()
    data = json.loads(report.read_text())
    (row,) = data["scenarios"]
    assert row["name"] == "single" and row["met"] and row["bit_exact"]
    assert row["files"] == 5 and row["bytes"] > 0 and row["checkpoint"] == str(checkpoint)


@pytest.mark.timeout(180)
def test_the_main_job_exits_non_zero_when_a_scenario_falls_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "forgetful.toml").write_text(SINGLE)
    assert main(["run", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "forgetful" in out and "fell short" in out


def test_a_malformed_scenario_stops_the_job_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.toml").write_text(SINGLE.replace('"global" }\nop', '"globl" }\nop', 1))
    assert main(["run", str(tmp_path)]) == 2
    assert "broken.toml: components.model.pattern" in capsys.readouterr().err


def test_check_validates_every_scenario_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(REPO / "scenarios")]) == 0
    assert "dp_tp_2x4: dp_tp" in capsys.readouterr().out
