"""The main job shows which scenario it is running, on stderr, before each one (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.__main__ import main

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_the_main_job_announces_each_scenario_before_running_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(SCENARIOS / "single.toml"), str(SCENARIOS / "ddp_1x4.toml")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert lines[-2:] == ["[1/2] single: single 1x1 ...", "[2/2] ddp_1x4: ddp 1x4 ..."]
    assert "[1/2]" not in captured.out  # the table on stdout stays a table
