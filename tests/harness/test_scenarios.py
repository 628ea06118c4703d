"""Every scenario file in scenarios/ runs as a test in the session's warm world pool."""

from __future__ import annotations

from pathlib import Path

import pytest

from distckpt.testing.pool import WorldPool
from harness.report import format_problems
from harness.runner import run_scenario
from harness.scenario import load_scenario

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"
SCENARIO_FILES = sorted(SCENARIO_DIR.glob("*.toml"))


@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", SCENARIO_FILES, ids=[p.stem for p in SCENARIO_FILES])
def test_scenario_meets_its_expectation(world_pool: WorldPool, path: Path, tmp_path: Path) -> None:
    scenario = load_scenario(path)
    result = run_scenario(world_pool, scenario, tmp_path)
    assert result.met, format_problems([result])
    if scenario.expect.succeeds:
        assert result.bit_exact is True
        assert (
            tmp_path / scenario.name / "checkpoints" / f"checkpoint-{scenario.run.save_at}"
        ).is_dir()
