"""Scenario parsing: frozen objects, defaults, and errors that name the file and the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from harness.scenario import Scenario, ScenarioError, load_scenario, load_scenarios, parse_scenario

WHERE = "scenarios/x.toml"


def _base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "trainer": "dp_tp",
        "topology": {"nodes": 1, "procs_per_node": 4, "mesh": {"dp": 2, "tp": 2}},
        "components": {
            "model": {"pattern": "per_group", "group": "dp", "validate": True},
            "rng": {"pattern": "per_rank"},
        },
    }
    data.update(overrides)
    return data


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, WHERE, default_name="x")
    return str(info.value)


def test_a_minimal_scenario_gets_defaults_and_is_frozen() -> None:
    s = parse_scenario(_base(), WHERE, default_name="x")
    assert isinstance(s, Scenario)
    assert (s.name, s.trainer, s.run.steps, s.run.save_at) == ("x", "dp_tp", 6, 3)
    assert s.topology.mesh == (("dp", 2), ("tp", 2))
    assert s.resume_topology == s.topology and not s.elastic
    assert s.expect.succeeds and s.expect.bit_exact
    assert s.component("model").group == "dp"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "y"  # type: ignore[misc]


def test_patterns_and_levels_are_case_insensitive() -> None:
    comps = {"model": {"pattern": "PER_GROUP", "group": "dp", "validate": True, "level": "FULL"}}
    s = parse_scenario(_base(components=comps), WHERE)
    assert (s.components[0].pattern, s.components[0].level) == ("per_group", "full")


@pytest.mark.parametrize(
    ("change", "field", "text"),
    [
        ({"trainer": "fsdp"}, "trainer", "expected one of"),
        ({"topology": {"nodes": 1}}, "topology.procs_per_node", "is required"),
        ({"topology": {"nodes": 0, "procs_per_node": 4}}, "topology.nodes", ">= 1"),
        (
            {"topology": {"nodes": 1, "procs_per_node": 4, "mesh": {"dp": 2, "tp": 3}}},
            "topology.mesh",
            "multiply to 6",
        ),
        (
            {"topology": {"nodes": 1, "procs_per_node": 4, "mesh": {"tp": 2, "dp": 2}}},
            "topology.mesh",
            "needs dp x tp",
        ),
        (
            {"components": {"model": {"pattern": "per_group", "group": "pp"}}},
            "components.model.group",
            "not a mesh dimension",
        ),
        ({"components": {"model": {"pattern": "per_group"}}}, "components.model.group", "required"),
        (
            {"components": {"model": {"pattern": "global", "validate": True}}},
            "components.model.validate",
            "no replicas",
        ),
        (
            {"components": {"model": {"pattern": "replicated", "group": "dp"}}},
            "components.model.group",
            "only pattern per_group",
        ),
        (
            {"components": {"model": {"pattern": "sharded"}}},
            "components.model.pattern",
            "expected one of",
        ),
        (
            {"components": {"cache": {"pattern": "per_node"}}},
            "components.cache",
            "no such component",
        ),
        (
            {"components": {"model": {"pattern": "replicated", "valdiate": True}}},
            "components.model.valdiate",
            "did you mean 'validate'",
        ),
        ({"run": {"steps": 3, "save_at": 4}}, "run.save_at", "<= steps"),
        ({"run": {"steps": "6"}}, "run.steps", "expected an integer"),
        ({"run": {"validate": 1}}, "run.validate", "expected a boolean"),
        ({"run": {"timeout": 30, "world_timeout": 10}}, "run.world_timeout", "must exceed"),
        ({"expect": {"outcome": "error", "stage": "save"}}, "expect.error", "is required"),
        (
            {"expect": {"outcome": "error", "error": "OSError", "stage": "save"}},
            "expect.error",
            "not a distckpt error",
        ),
        ({"expect": {"outcome": "error", "error": "CheckpointError"}}, "expect.stage", "required"),
        ({"expect": {"error": "CheckpointError"}}, "expect.error", "only applies"),
        (
            {"expect": {"writers": {"optimizer": [0]}}},
            "expect.writers.optimizer",
            "not a declared component",
        ),
        ({"expect": {"writers": {"model": [0, 9]}}}, "expect.writers.model", "outside the world"),
        ({"expect": {"writers": {"model": [0, 1]}}}, "expect.writers", "every component"),
        ({"faults": [{"kind": "raise", "ranks": [1]}]}, "faults[0].phase", "required"),
        (
            {"faults": [{"kind": "diverge", "ranks": [1], "component": "optimizer"}]},
            "faults[0].component",
            "not a declared component",
        ),
        (
            {"faults": [{"kind": "sigkill", "phase": "write", "ranks": [1]}]},
            "faults",
            "must expect an error",
        ),
        ({"options": {"hiden": 8}}, "options.hiden", "did you mean 'hidden'"),
        ({"resume": {"procs_per_node": 2}}, "resume.mesh", "give the resuming world's mesh"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"run": {"min_part_bytes": 0}}, "run.min_part_bytes", ">= 1"),
        ({"run": {"load_strategy": "guess"}}, "run.load_strategy", "expected one of"),
        ({"expect": {"parts": {"optimizer": 2}}}, "expect.parts.optimizer", "not a declared component"),
        ({"expect": {"parts": {"model": 0}}}, "expect.parts.model", ">= 1"),
        ({"name": "../escape"}, "name", "not a valid name"),
    ],
)
def test_errors_name_the_file_and_the_field(change: dict[str, Any], field: str, text: str) -> None:
    message = _error(_base(**change))
    assert message.startswith(f"{WHERE}: {field}: "), message
    assert text in message


def test_an_elastic_positive_scenario_may_only_hold_global_or_replicated_state() -> None:
    data = _base(
        trainer="ddp",
        topology={"nodes": 1, "procs_per_node": 4},
        resume={"procs_per_node": 2},
        components={"model": {"pattern": "replicated"}, "rng": {"pattern": "per_rank"}},
    )
    assert "expect error TopologyMismatchError" in _error(data)
    data["components"] = {"model": {"pattern": "replicated"}}
    s = parse_scenario(data, WHERE)
    assert s.elastic and s.describe_world() == "1x4->1x2"


def test_trainer_world_limits_are_enforced() -> None:
    data = _base(
        trainer="single",
        topology={"nodes": 1, "procs_per_node": 2},
        components={"model": {"pattern": "global"}},
    )
    assert "runs on 1 to 1 ranks" in _error(data)
    data = _base(
        trainer="per_node",
        topology={"nodes": 1, "procs_per_node": 2},
        components={"cache": {"pattern": "per_node"}},
    )
    assert "at least 2 nodes" in _error(data)


def test_files_are_read_with_their_name_and_invalid_toml_is_reported(tmp_path: Path) -> None:
    good = tmp_path / "good_one.toml"
    good.write_text(
        'trainer = "single"\n[topology]\nprocs_per_node = 1\n'
        '[components]\nmodel = { pattern = "global" }\n'
    )
    assert load_scenario(good).name == "good_one"
    bad = tmp_path / "bad.toml"
    bad.write_text("trainer = \n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: invalid TOML"):
        load_scenario(bad)
    twin = tmp_path / "twin.toml"
    twin.write_text(good.read_text().replace("trainer", 'name = "good_one"\ntrainer', 1))
    with pytest.raises(ScenarioError, match="is also the name of"):
        load_scenarios([good, twin])


def test_balanced_writes_and_the_load_strategy_are_scenario_settings() -> None:
    data = _base(run={"min_part_bytes": 512, "load_strategy": "read_and_broadcast"}, expect={"parts": {"model": 2}})
    s = parse_scenario(data, WHERE)
    assert (s.run.min_part_bytes, s.run.load_strategy, dict(s.expect.parts)) == (512, "read_and_broadcast", {"model": 2})
    default = parse_scenario(_base(), WHERE)
    assert (default.run.min_part_bytes, default.run.load_strategy, dict(default.expect.parts)) == (None, None, {})
