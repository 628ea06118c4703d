"""run.validate = true works on every layout the guide recommends (issue 14).

Each scenario file also runs as a test (tests/harness/test_scenarios.py); these
checks make sure the validated variants exist, so that a trainer whose replicas
drift apart (as the dp_pp data loader once did along "pp") fails the main job.
"""

from __future__ import annotations

from pathlib import Path

from harness.scenario import load_scenarios

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"
#: The layouts docs/guide.md recommends declarations for.
GUIDE_LAYOUTS = ("single", "ddp", "dp_tp", "dp_pp", "pp", "per_node")


def test_every_layout_of_the_guide_has_a_scenario_that_validates_every_component() -> None:
    validated = {s.trainer for s in load_scenarios([SCENARIO_DIR]) if s.expect.succeeds and s.run.validate}
    assert set(GUIDE_LAYOUTS) <= validated


def test_the_guides_dp_x_pp_declarations_are_run_with_validation_on_both_shapes() -> None:
    shapes = {tuple(s.topology.mesh) for s in load_scenarios([SCENARIO_DIR])
              if s.trainer == "dp_pp" and s.expect.succeeds and s.run.validate
              and s.component("dataset").pattern == "per_group" and s.component("dataset").group == "pp"}
    assert (("dp", 2), ("pp", 2)) in shapes and (("dp", 2), ("pp", 4)) in shapes
