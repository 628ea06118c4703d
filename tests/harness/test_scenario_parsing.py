"""Scenario parsing: frozen objects, defaults, and errors that name the file and the field."""

from __future__ import annotations

import dataclasses
import json
import uuid
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
        ({"trainer": "no_such_trainer"}, "trainer", "expected one of"),
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
            "'sharded' is not a registered sharing pattern",
        ),
        (
            {"components": {"model": {"pattern": "per_group", "group": ["dp", "pp"]}}},
            "components.model.group",
            "'pp' is not a mesh dimension",
        ),
        ({"components": {"model": {"pattern": "per_group", "group": []}}}, "components.model.group", "at least one"),
        (
            {"components": {"model": {"pattern": "per_group", "group": ["dp", "dp"]}}},
            "components.model.group",
            "names repeat",
        ),
        (
            {"components": {"model": {"pattern": "per_group", "group": [1]}}},
            "components.model.group",
            "expected mesh dimension names",
        ),
        (
            {"components": {"model": {"pattern": "per_rank", "group": ["dp"]}}},
            "components.model.group",
            "only pattern per_group",
        ),
        (
            {"components": {"model": {"pattern": "global", "params": {"size": 2}}}},
            "components.model.params",
            "pattern global refuses params {'size': 2}",
        ),
        (
            {"components": {"model": {"pattern": "per_group", "group": "dp", "params": {"groups": ["dp"]}}}},
            "components.model.params",
            "not both",
        ),
        (
            {"components": {"model": {"pattern": "per_group", "params": {"groups": ["dp", "xx"]}}}},
            "components.model.params",
            "groups ['xx'] are not mesh dimensions",
        ),
        ({"components": {"model": {"pattern": "replicated", "params": 3}}}, "components.model.params", "a table"),
        ({"imports": "mine.py"}, "imports", "expected a list"),
        ({"imports": [""]}, "imports[0]", "expected a module name"),
        ({"imports": ["no_such_dir/mine.py"]}, "imports[0]", "which is not a file"),
        ({"imports": ["no such module"]}, "imports[0]", "neither a module name nor a path"),
        ({"imports": ["harness_no_such_module_anywhere"]}, "imports[0]", "ModuleNotFoundError"),
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
        ({"run": {"save_mode": "later"}}, "run.save_mode", "expected one of sync, async, async_background_staging"),
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


def test_balanced_writes_the_load_strategy_and_direct_io_are_scenario_settings() -> None:
    data = _base(run={"min_part_bytes": 512, "load_strategy": "read_and_broadcast", "direct_io": True},
                 expect={"parts": {"model": 2}})
    s = parse_scenario(data, WHERE)
    assert (s.run.min_part_bytes, s.run.load_strategy, s.run.direct_io, dict(s.expect.parts)) == (
        512, "read_and_broadcast", True, {"model": 2})
    default = parse_scenario(_base(), WHERE)
    assert (default.run.min_part_bytes, default.run.load_strategy, default.run.direct_io,
            dict(default.expect.parts)) == (None, None, False, {})


def test_a_group_list_declares_the_join_and_params_may_name_the_groups() -> None:
    from distckpt.patterns import PerGroup

    comps = {
        "model": {"pattern": "per_group", "group": ["tp", "dp"], "validate": True},
        "rng": {"pattern": "per_group", "params": {"groups": ["tp"]}},
        "dataset": {"pattern": "Per_Group", "group": "dp"},
        "optimizer": {"pattern": "per_group", "params": {"groups": "dp"}},
    }
    s = parse_scenario(_base(components=comps), WHERE)
    model, rng, dataset = (s.component(k) for k in ("model", "rng", "dataset"))
    assert (model.group, model.record()) == (("tp", "dp"), {"kind": "per_group", "params": {"groups": ["tp", "dp"]}})
    assert model.pattern_object() == PerGroup("tp", "dp")
    assert (rng.group, rng.pattern_object()) == ("tp", PerGroup("tp"))
    assert (dataset.pattern, dataset.params, dataset.pattern_object()) == ("per_group", {"groups": ["dp"]}, PerGroup("dp"))
    assert s.component("optimizer") == dataclasses.replace(dataset, key="optimizer")


_PATTERN_MODULE = """
from dataclasses import dataclass
from distckpt import Pattern, register_pattern

@register_pattern
@dataclass(frozen=True, eq=False, repr=False)
class Blocks(Pattern):
    kind = "{kind}"
    size: int
    elastic = {elastic}

    def replica_sets(self, topology):
        if self.size < 1:
            raise ValueError("size must be positive")
        return [range(s, min(s + self.size, topology.world_size)) for s in range(0, topology.world_size, self.size)]
"""


def _pattern_file(path: Path, *, elastic: bool = False) -> str:
    """Write a module registering a pattern of a fresh kind; returns the kind."""
    kind = f"harness_test_{uuid.uuid4().hex[:12]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_PATTERN_MODULE.format(kind=kind, elastic=elastic), encoding="utf-8")
    return kind


def _scenario_file(path: Path, imports: list[str], model: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"trainer = \"ddp\"\nimports = {json.dumps(imports)}\n[topology]\nnodes = 2\nprocs_per_node = 2\n"
        f"[components]\nmodel = {model}\n",
        encoding="utf-8",
    )
    return path


def test_imports_register_patterns_from_a_path_relative_to_the_scenario_file(tmp_path: Path) -> None:
    from distckpt import registered_patterns

    kind = _pattern_file(tmp_path / "patterns" / "blocks.py")
    assert kind not in registered_patterns()
    scenario = _scenario_file(tmp_path / "scenarios" / "mine.toml", ["../patterns/blocks.py"],
                              f'{{ pattern = "{kind}", params = {{ size = 3 }}, validate = true }}')
    s = load_scenario(scenario)
    assert s.imports == (str((tmp_path / "patterns" / "blocks.py").resolve()),)
    model = s.component("model")
    assert (model.pattern, dict(model.params), model.group, model.validate) == (kind, {"size": 3}, None, True)
    assert model.pattern_object() == registered_patterns()[kind](size=3)
    assert load_scenario(scenario).component("model") == model  # importing again registers nothing twice


def test_errors_of_user_patterns_name_the_scenario_file(tmp_path: Path) -> None:
    kind = _pattern_file(tmp_path / "blocks.py")
    cases = {
        '{ pattern = "' + kind + '", params = { size = 2, colour = 1 } }': "components.model.params: pattern",
        '{ pattern = "' + kind + '", params = { size = 0 } }': "components.model.pattern: " + kind + " does not give",
        '{ pattern = "' + kind + '", group = "dp" }': "components.model.group: only pattern per_group",
    }
    for model, text in cases.items():
        path = _scenario_file(tmp_path / "x.toml", ["blocks.py"], model)
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        assert str(info.value).startswith(f"{path}: {text}"), str(info.value)
    # without the import the kind is unknown, and the message says how to make it known
    with pytest.raises(ScenarioError, match=r"y\.toml: components\.model\.pattern: .* top-level imports"):
        load_scenario(_scenario_file(tmp_path / "y.toml", [], '{ pattern = "harness_test_unknown_kind" }'))


def test_a_module_that_fails_to_import_is_named_with_its_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n", encoding="utf-8")
    (tmp_path / "syntax.py").write_text("def (:\n", encoding="utf-8")
    for name, text in (("broken.py", "RuntimeError: boom at import"), ("syntax.py", "SyntaxError")):
        path = _scenario_file(tmp_path / "z.toml", [name], '{ pattern = "replicated" }')
        with pytest.raises(ScenarioError) as info:
            load_scenario(path)
        message = str(info.value)
        assert message.startswith(f"{path}: imports[0]: importing {tmp_path / name} failed") and text in message


def test_an_elastic_scenario_may_hold_a_user_pattern_that_says_it_is_elastic(tmp_path: Path) -> None:
    fixed, elastic = _pattern_file(tmp_path / "fixed.py"), _pattern_file(tmp_path / "elastic.py", elastic=True)
    for kind, ok in ((fixed, False), (elastic, True)):
        path = _scenario_file(tmp_path / "e.toml", ["fixed.py", "elastic.py"],
                              f'{{ pattern = "{kind}", params = {{ size = 4 }} }}')
        path.write_text(path.read_text() + "[resume]\nnodes = 1\n", encoding="utf-8")
        if ok:
            assert load_scenario(path).elastic
        else:
            with pytest.raises(ScenarioError, match="cannot be resumed into another world"):
                load_scenario(path)


def test_a_dotted_module_and_the_same_file_by_path_are_one_module() -> None:
    root = Path(__file__).resolve().parents[2]
    data = _base(trainer="ddp", topology={"nodes": 2, "procs_per_node": 2},
                 components={"model": {"pattern": "per_local_rank", "validate": True}})
    by_path = parse_scenario(dict(data, imports=["../examples/patterns/per_local_rank.py"]),
                             str(root / "scenarios" / "x.toml"))
    by_name = parse_scenario(dict(data, imports=["examples.patterns.per_local_rank"]), WHERE)
    assert by_name.component("model") == by_path.component("model")
    assert by_name.imports == ("examples.patterns.per_local_rank",)


def test_the_save_mode_is_a_scenario_setting_and_defaults_to_a_synchronous_save() -> None:
    s = parse_scenario(_base(run={"save_mode": "async_background_staging"}), WHERE)
    assert s.run.save_mode == "async_background_staging"
    assert parse_scenario(_base(), WHERE).run.save_mode == "sync"


@pytest.mark.parametrize("direct", [False, True])
def test_a_scenario_with_direct_io_gets_a_coordinator_that_writes_with_o_direct(tmp_path: Path, direct: bool) -> None:
    from types import SimpleNamespace

    from harness import session

    class Holder:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: Any) -> None:
            pass

    data = _base(topology={"nodes": 1, "procs_per_node": 1}, trainer="ddp",
                 components={"model": {"pattern": "replicated"}}, run={"direct_io": direct})
    scenario = parse_scenario(data, WHERE)
    trainer = SimpleNamespace(components=lambda: {"model": Holder()}, process_groups=lambda: {})
    coord = session.coordinator(SimpleNamespace(workdir=str(tmp_path)), scenario, trainer)  # type: ignore[arg-type]
    assert coord.direct_io is direct
