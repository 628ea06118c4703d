"""The scenario collection covers every layout, variant and negative case the harness promises."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from harness.scenario import TRAINERS, load_scenarios
from harness.trainers import TRAINER_CLASSES

SCENARIO_DIR = Path(__file__).resolve().parents[2] / "scenarios"


def test_every_scenario_file_parses_and_names_are_unique() -> None:
    scenarios = load_scenarios([SCENARIO_DIR])
    assert len(scenarios) >= 15
    assert len({s.name for s in scenarios}) == len(scenarios)


def test_the_trainer_table_of_the_parser_matches_the_trainer_classes() -> None:
    assert set(TRAINERS) == set(TRAINER_CLASSES)


def test_every_layout_has_a_positive_scenario() -> None:
    positive = Counter(s.trainer for s in load_scenarios([SCENARIO_DIR]) if s.expect.succeeds)
    assert set(positive) == set(TRAINERS)


def test_the_promised_variants_exist() -> None:
    scenarios = load_scenarios([SCENARIO_DIR])
    shapes = {(s.trainer, tuple(s.topology.mesh)) for s in scenarios if s.expect.succeeds}
    for trainer, dims in (("dp_tp", ("dp", "tp")), ("dp_pp", ("dp", "pp"))):
        assert (trainer, ((dims[0], 2), (dims[1], 2))) in shapes
        assert (trainer, ((dims[0], 2), (dims[1], 4))) in shapes
    assert any(s.trainer == "per_node" and s.topology.nodes >= 2 for s in scenarios)
    elastic = [s for s in scenarios if s.elastic and s.expect.succeeds]
    assert any(s.topology.world_size == 4 and s.resume_topology.world_size == 2 for s in elastic)
    for s in elastic:
        assert {c.pattern for c in s.components} <= {"global", "replicated"}


def test_the_promised_negative_scenarios_exist() -> None:
    negative = [s for s in load_scenarios([SCENARIO_DIR]) if not s.expect.succeeds]
    found = {(s.trainer, s.expect.error, s.expect.stage) for s in negative}
    assert ("dp_tp", "ReplicationMismatchError", "save") in found
    assert ("ddp", "ReplicationMismatchError", "save") in found
    assert any(e == "TopologyMismatchError" and st == "load" for _, e, st in found)
    tp_model = [s for s in negative if s.trainer == "dp_tp"]
    assert any(
        s.component("model").group == "tp" and s.component("model").validate for s in tp_model
    )


def test_scenarios_stay_within_thirty_two_ranks_and_one_runs_sixteen_on_four_nodes() -> None:
    scenarios = load_scenarios([SCENARIO_DIR])
    for s in scenarios:
        assert s.topology.world_size <= 32 and s.resume_topology.world_size <= 32, s.name
    assert any(
        s.expect.succeeds and s.topology.world_size == 16 and s.topology.nodes == 4
        and s.trainer == "dp_tp" for s in scenarios
    )


def test_uneven_nodes_and_a_component_added_at_resume_are_run_by_the_main_job() -> None:
    scenarios = load_scenarios([SCENARIO_DIR])
    assert any(
        s.expect.succeeds and s.topology.node_sizes == (3, 2, 1)
        and any(c.pattern == "per_node" for c in s.components) for s in scenarios
    )
    added = [s for s in scenarios if s.expect.succeeds and s.expected_skipped()]
    assert any(
        all(not c.required for c in s.resuming if c.key in s.expected_skipped()) for s in added
    )


def test_a_user_pattern_and_a_join_of_groups_are_run_by_the_main_job() -> None:
    scenarios = load_scenarios([SCENARIO_DIR])
    user = [(s, c) for s in scenarios for c in s.components if c.pattern == "per_local_rank"]
    assert any(s.expect.succeeds and c.validate and s.expect.writers and s.imports for s, c in user)
    assert any(s.expect.error == "ReplicationMismatchError" for s, _ in user)
    joins = [s for s in scenarios for c in s.components if isinstance(c.group, tuple) and len(c.group) > 1]
    assert any(s.expect.succeeds for s in joins)
