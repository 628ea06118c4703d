"""Scenario files express every layout: uneven nodes, big worlds, a resuming world's own components."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distckpt.testing.declare import Declaration
from harness import oracle
from harness.__main__ import main
from harness.report import format_row, table_header
from harness.runner import ScenarioResult, run_scenario
from harness.scenario import ComponentSpec, ScenarioError, Topology, load_scenario, parse_scenario
from tests.property.strategies import Decl

WHERE = "scenarios/x.toml"
PER_NODE = {
    "model": {"pattern": "replicated"},
    "cache": {"pattern": "per_node", "validate": True},
    "rng": {"pattern": "per_rank"},
}


def _data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trainer": "per_node",
        "topology": {"procs_per_node": [3, 2, 1]},
        "components": dict(PER_NODE),
    }
    data.update(overrides)
    return data


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, WHERE)
    return str(info.value)


def test_a_list_of_node_sizes_gives_nodes_of_different_sizes_numbered_node_by_node() -> None:
    s = parse_scenario(_data(), WHERE)
    assert (s.topology.nodes, s.topology.node_sizes, s.topology.world_size) == (3, (3, 2, 1), 6)
    assert s.describe_world() == "3+2+1"
    world = oracle.scenario_world(s.topology)
    assert world.nodes == ((0, 1, 2), (3, 4), (5,))
    assert oracle.replica_sets(world, "per_node") == ((0, 1, 2), (3, 4), (5,))


def test_equal_node_sizes_in_a_list_are_the_same_world_as_one_size() -> None:
    listed = parse_scenario(_data(topology={"procs_per_node": [2, 2]}), WHERE)
    assert listed.topology == Topology(nodes=2, procs_per_node=2)
    assert listed.describe_world() == "2x2"


@pytest.mark.parametrize(
    ("topology", "field", "text"),
    [
        ({"nodes": 2, "procs_per_node": [3, 2, 1]}, "topology.nodes", "lists 3 node sizes"),
        ({"procs_per_node": [3, 0]}, "topology.procs_per_node", "positive integers"),
        ({"procs_per_node": []}, "topology.procs_per_node", "at least one node size"),
        ({"procs_per_node": [2, True]}, "topology.procs_per_node", "positive integers"),
        ({"nodes": 3, "procs_per_node": 11}, "topology.procs_per_node", "at most 32 ranks"),
    ],
)
def test_bad_node_sizes_name_the_field(topology: dict[str, Any], field: str, text: str) -> None:
    message = _error(_data(topology=topology))
    assert message.startswith(f"{WHERE}: {field}: ") and text in message, message


def test_worlds_up_to_thirty_two_ranks_are_accepted() -> None:
    s = parse_scenario(_data(topology={"nodes": 4, "procs_per_node": 8}), WHERE)
    assert s.topology.world_size == 32
    big = _data(trainer="dp_tp", topology={"nodes": 4, "procs_per_node": 4, "mesh": {"dp": 4, "tp": 4}},
                components={"model": {"pattern": "per_group", "group": "dp"}})
    assert parse_scenario(big, WHERE).topology.world_size == 16


def test_a_resuming_world_of_uneven_nodes_needs_its_own_sizes() -> None:
    data = _data(trainer="ddp", components={"model": {"pattern": "replicated"}},
                 resume={"nodes": 2})
    assert "give the resuming world's sizes" in _error(data)
    data["resume"] = {"procs_per_node": [1, 1]}
    s = parse_scenario(data, WHERE)
    assert s.elastic and s.describe_world() == "3+2+1->2x1"


def test_resume_components_add_an_optional_component_reported_as_skipped() -> None:
    data = _data(resume={"components": {"dataset": {"pattern": "per_rank", "required": False}}})
    s = parse_scenario(data, WHERE)
    assert not s.elastic and [c.key for c in s.components] == ["model", "cache", "rng"]
    assert [c.key for c in s.resuming] == ["model", "cache", "rng", "dataset"]
    assert s.expected_skipped() == {"dataset": "optional component not in checkpoint"}
    assert s.expected_loaded() == ["cache", "model", "rng"]


def test_resume_components_change_a_saved_declaration_field_by_field() -> None:
    data = _data(resume={"components": {"cache": {"required": False}}})
    s = parse_scenario(data, WHERE)
    saved, resumed = s.component("cache"), next(c for c in s.resuming if c.key == "cache")
    assert (saved.required, resumed.required) == (True, False)
    assert (resumed.pattern, resumed.validate) == ("per_node", True)
    assert s.expected_skipped() == {}


def test_a_dropped_component_needs_a_non_strict_load_in_a_positive_scenario() -> None:
    data = _data(resume={"components": {"rng": {"declared": False}}})
    assert "set resume.strict = false" in _error(data)
    data["resume"]["strict"] = False
    s = parse_scenario(data, WHERE)
    assert not s.resume_strict and [c.key for c in s.resuming] == ["model", "cache"]
    assert s.expected_skipped() == {"rng": "in checkpoint but not declared"}


@pytest.mark.parametrize(
    ("components", "field", "text"),
    [
        ({"dataset": {"pattern": "per_rank"}}, "resume.components", "required but not in the checkpoint"),
        ({"bogus": {"pattern": "per_rank"}}, "resume.components.bogus", "has no such component"),
        ({"dataset": {"declared": False}}, "resume.components.dataset", "does not declare it"),
        ({"cache": {"declared": False, "required": False}}, "resume.components.cache.declared", "stands alone"),
        ({"cache": {"requred": False}}, "resume.components.cache.requred", "did you mean 'required'"),
    ],
)
def test_bad_resume_components_name_the_field(components: dict[str, Any], field: str, text: str) -> None:
    message = _error(_data(resume={"components": components}))
    assert message.startswith(f"{WHERE}: {field}: ") and text in message, message


def test_a_required_component_added_at_resume_may_be_expected_to_fail_the_load() -> None:
    data = _data(resume={"components": {"dataset": {"pattern": "per_rank"}}},
                 expect={"outcome": "error", "error": "ComponentMismatchError", "stage": "load"})
    assert parse_scenario(data, WHERE).expected_skipped() == {"dataset": "optional component not in checkpoint"}


def test_the_harness_and_the_tests_share_one_declaration_dataclass() -> None:
    assert ComponentSpec is Declaration is Decl
    d = Declaration("model", "per_group", group=["dp", "tp"])  # type: ignore[arg-type]
    assert d.group == ("dp", "tp") and d.record() == {"kind": "per_group", "params": {"groups": ["dp", "tp"]}}
    assert d.validated(save_validate=True) and not Declaration("rng", "per_rank").can_validate
    with pytest.raises(ValueError, match="level"):
        Declaration("model", "replicated", level="loud")


@pytest.mark.timeout(120)
def test_a_required_component_added_at_resume_fails_the_load_on_every_rank(
    world_pool: Any, tmp_path: Path
) -> None:
    path = tmp_path / "added.toml"
    path.write_text("""
trainer = "ddp"
[topology]
nodes = 2
procs_per_node = 1
[run]
steps = 2
save_at = 1
[components]
model = { pattern = "replicated" }
[resume.components]
rng = { pattern = "per_rank" }
[expect]
outcome = "error"
error = "ComponentMismatchError"
stage = "load"
""")
    result = run_scenario(world_pool, load_scenario(path))
    assert result.met, result.problems
    assert "required component 'rng' is not in the checkpoint" in result.detail


def test_check_reports_every_bad_file_not_only_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = 'trainer = "single"\n[topology]\nprocs_per_node = 1\n[components]\nmodel = { pattern = "global" }\n'
    (tmp_path / "a_bad.toml").write_text(good.replace('"global"', '"globl"'))
    (tmp_path / "b_good.toml").write_text(good)
    (tmp_path / "c_bad.toml").write_text("trainer = \n")
    (tmp_path / "d_bad.toml").write_text(good.replace("procs_per_node = 1", "procs_per_node = [1, 0]"))
    assert main(["check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for name, field in (("a_bad", "components.model.pattern"), ("c_bad", "invalid TOML"),
                        ("d_bad", "topology.procs_per_node")):
        assert f"{name}.toml: {field}" in err, err
    assert "b_good" not in err and "3 bad scenario files" in err


def test_the_results_table_never_cuts_a_scenario_name() -> None:
    name = "a_scenario_name_far_longer_than_the_thirty_characters_of_the_column"
    row = format_row(ScenarioResult(name, "dp_tp", "3+2+1 dp2xtp3", "x.toml", 5, "success", met=True),
                     len(name))
    header = table_header(len(name))
    assert row.startswith(name + "  ")
    assert header.index("layout") == row.index("dp_tp")
