"""The oracle's reading of the design: replica sets, writers and file names from plain data alone."""

from __future__ import annotations

import ast
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from distckpt import Pattern, Topology, register_pattern
from harness import oracle
from harness.oracle import (
    World,
    expected_component,
    join,
    mesh_partition,
    node_blocks,
    replica_sets,
)
from harness.scenario import ComponentSpec, RunSpec, Scenario
from harness.scenario import Topology as ScenarioTopology

DP_TP_2x4 = ScenarioTopology(nodes=2, procs_per_node=4, mesh=(("dp", 2), ("tp", 4)))
W_2x4 = oracle.scenario_world(DP_TP_2x4)


@register_pattern
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Strided(Pattern):
    """A pattern of a test's own: rank r in set r % stride (params: the stride)."""

    kind = "harness_oracle_test_strided"
    stride: int = 2

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [range(k, topology.world_size, self.stride) for k in range(min(self.stride, topology.world_size))]

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"stride-{index}"


def test_dp_by_tp_groups_follow_the_design_example() -> None:
    assert W_2x4.group("dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert W_2x4.group("tp") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert W_2x4.nodes == node_blocks(2, 4) == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_a_three_dimensional_mesh_is_row_major() -> None:
    mesh = (("a", 2), ("b", 2), ("c", 2))
    assert mesh_partition(mesh, "c") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert mesh_partition(mesh, "b") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert mesh_partition(mesh, "a") == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_patterns_give_their_replica_sets() -> None:
    world = oracle.scenario_world(ScenarioTopology(nodes=2, procs_per_node=2))
    assert replica_sets(world, "global") == ((0, 1, 2, 3),)
    assert replica_sets(world, "replicated") == ((0, 1, 2, 3),)
    assert replica_sets(world, "per_rank") == ((0,), (1,), (2,), (3,))
    assert replica_sets(world, "per_node") == world.nodes == ((0, 1), (2, 3))


def test_the_join_of_pp_and_tp_on_a_three_dimensional_mesh_is_one_set_per_dp_coordinate() -> None:
    mesh = (("dp", 2), ("pp", 2), ("tp", 2))
    world = World.of(node_blocks(2, 4), {n: mesh_partition(mesh, n) for n, _ in mesh})
    assert replica_sets(world, "per_group", {"groups": ["pp", "tp"]}) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert replica_sets(world, "per_group", {"groups": ["dp", "tp"]}) == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert join(8, [world.group("dp"), world.group("pp"), world.group("tp")]) == (tuple(range(8)),)
    files = expected_component(world, "dataset", "per_group", {"groups": ["pp", "tp"]})
    assert [(f.path, f.writer) for f in files.files] == [
        ("dataset/pp_tp-000.safetensors", 0), ("dataset/pp_tp-001.safetensors", 4)]
    assert files.group is None and files.record == {"kind": "per_group", "params": {"groups": ["pp", "tp"]}}


def test_join_chains_through_groups_that_overlap_only_pairwise() -> None:
    a = ((0, 1), (2, 3), (4,), (5,))
    b = ((0,), (1, 2), (3,), (4, 5))
    assert join(6, [a, b]) == ((0, 1, 2, 3), (4, 5))
    assert join(3, [((0,), (1,), (2,))]) == ((0,), (1,), (2,))


def test_uneven_nodes_in_any_rank_order_give_nodes_ordered_by_lowest_rank() -> None:
    world = World.of([[4, 1], [0, 2, 3]], {"g": [[3, 4], [0, 1, 2]]})
    assert world.world_size == 5 and world.nodes == ((0, 2, 3), (1, 4))
    assert replica_sets(world, "per_node") == ((0, 2, 3), (1, 4))
    cache = expected_component(world, "cache", "per_node")
    assert [(f.path, f.ranks, f.writer) for f in cache.files] == [
        ("cache/node-000.safetensors", (0, 2, 3), 0), ("cache/node-001.safetensors", (1, 4), 1)]
    # balanced parts go node by node: lowest of each node, then the second lowest of each
    parts = expected_component(world, "model", "replicated", parts=3)
    assert [f.writer for f in parts.files] == [0, 1, 2]


def test_files_and_writers_of_each_pattern() -> None:
    model = oracle.expected_of_spec(W_2x4, ComponentSpec("model", "per_group", "dp"))
    assert model.writers == (0, 1, 2, 3) and model.group == "dp"
    assert model.record == {"kind": "per_group", "params": {"groups": ["dp"]}}
    assert [f.path for f in model.files] == [f"model/dp-00{i}.safetensors" for i in range(4)]
    assert model.files[1].ranks == (1, 5)
    data = oracle.expected_of_spec(W_2x4, ComponentSpec("dataset", "per_group", "tp"))
    assert data.writers == (0, 4)
    rng = oracle.expected_of_spec(W_2x4, ComponentSpec("rng", "per_rank"))
    assert rng.files[5].path == "rng/rank-00005.safetensors" and rng.record == {"kind": "per_rank", "params": {}}
    cache = oracle.expected_of_spec(W_2x4, ComponentSpec("cache", "per_node"))
    assert [(f.path, f.writer) for f in cache.files] == [
        ("cache/node-000.safetensors", 0),
        ("cache/node-001.safetensors", 4),
    ]
    sched = oracle.expected_of_spec(W_2x4, ComponentSpec("scheduler", "replicated"))
    assert [(f.path, f.ranks) for f in sched.files] == [
        ("scheduler/replicated.safetensors", tuple(range(8)))
    ]


def test_balanced_parts_are_written_node_by_node_from_each_nodes_lowest_rank() -> None:
    model = expected_component(W_2x4, "model", "per_group", {"groups": ["dp"]}, parts=2)
    assert [(f.path, f.writer) for f in model.files[:2]] == [
        ("model/dp-000.part-000-of-002.safetensors", 0),
        ("model/dp-000.part-001-of-002.safetensors", 4),
    ]
    assert model.writers == tuple(range(8)) and model.replica_sets == ((0, 4), (1, 5), (2, 6), (3, 7))
    data = expected_component(W_2x4, "dataset", "per_group", {"groups": ["tp"]}, parts=2)
    assert [(f.path, f.writer) for f in data.files[:2]] == [
        ("dataset/tp-000.part-000-of-002.safetensors", 0), ("dataset/tp-000.part-001-of-002.safetensors", 1)]
    sched = expected_component(W_2x4, "scheduler", "replicated", parts=3)
    assert [f.writer for f in sched.files] == [0, 4, 1]  # node by node


def test_a_registered_kind_of_ones_own_is_derived_from_the_pattern_object() -> None:
    world = World.of([[0, 1, 2], [3, 4]])
    comp = expected_component(world, "model", Strided.kind, {"stride": 2})
    assert comp.replica_sets == ((0, 2, 4), (1, 3))
    assert [(f.path, f.ranks, f.writer) for f in comp.files] == [
        ("model/stride-0.safetensors", (0, 2, 4), 0), ("model/stride-1.safetensors", (1, 3), 1)]
    assert comp.record == {"kind": Strided.kind, "params": {"stride": 2}} and comp.group is None
    # the manifest records the params the pattern object reports, defaults included
    assert expected_component(world, "model", Strided.kind, {}).record == comp.record
    parts = expected_component(world, "model", Strided.kind, {"stride": 2}, parts=2)
    assert [(f.path, f.writer) for f in parts.files[:2]] == [
        ("model/stride-0.part-000-of-002.safetensors", 0), ("model/stride-0.part-001-of-002.safetensors", 4)]


def test_a_registered_pattern_that_does_not_partition_the_world_is_refused() -> None:
    with pytest.raises(ValueError, match="do not partition"):
        replica_sets(World.of([[0, 1, 2]]), Strided.kind, {"stride": 0})
    with pytest.raises(LookupError, match="not registered"):
        replica_sets(World.of([[0, 1]]), "harness_oracle_test_nobody", {})


def test_the_built_in_oracle_imports_none_of_distckpts_partition_code() -> None:
    tree = ast.parse(Path(oracle.__file__).read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert not {m for m in imported if m.startswith(("distckpt.topology", "distckpt.layout"))}
    # distckpt.patterns only rebuilds a non-built-in pattern object, inside a function
    top_level = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in top_level if m.startswith("distckpt")}


def _fake_checkpoint(root: Path, scenario: Scenario) -> dict[str, object]:
    """A checkpoint on disk exactly as the oracle expects it (files of one byte)."""
    expected = oracle.expected_components(scenario)
    components = {}
    for key, comp in expected.items():
        for f in comp.files:
            (root / f.path).parent.mkdir(parents=True, exist_ok=True)
            (root / f.path).write_bytes(b"x")
        components[key] = {
            "sharing_pattern": comp.pattern, "group_name": comp.group, "pattern": comp.record,
            "ranks": list(comp.writers), "replicated_across": [list(s) for s in comp.replica_sets],
            "files": [{"path": f.path, "ranks": list(f.ranks), "writer": f.writer, "size_bytes": 1}
                      for f in comp.files],
        }
    manifest = {"world_size": scenario.topology.world_size, "components": components}
    (root / oracle.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_check_checkpoint_reads_the_pattern_record_of_every_component(tmp_path: Path) -> None:
    topo = ScenarioTopology(nodes=2, procs_per_node=3, mesh=(("dp", 2), ("pp", 3)))
    scenario = Scenario(
        name="x", path="x.toml", trainer="dp_pp", topology=topo, resume_topology=topo,
        run=RunSpec(),
        components=(ComponentSpec("model", Strided.kind, params={"stride": 3}),
                    ComponentSpec("dataset", "per_group", ("dp", "pp")),
                    ComponentSpec("rng", "per_rank")),
    )
    manifest = _fake_checkpoint(tmp_path, scenario)
    assert oracle.check_checkpoint(str(tmp_path), scenario) == []
    assert (tmp_path / "model" / "stride-2.safetensors").is_file()
    assert (tmp_path / "dataset" / "dp_pp-000.safetensors").is_file()
    components = manifest["components"]
    assert isinstance(components, dict)
    components["model"]["pattern"] = {"kind": Strided.kind, "params": {"stride": 2}}
    components["dataset"]["group_name"] = "dp"
    (tmp_path / oracle.MANIFEST).write_text(json.dumps(manifest))
    problems = oracle.check_checkpoint(str(tmp_path), scenario)
    assert any(p.startswith("model: pattern is") for p in problems), problems
    assert any(p.startswith("dataset: group_name is 'dp'") for p in problems), problems
    assert len(problems) == 2


def test_check_checkpoint_reads_files_listed_as_a_table_with_and_without_a_ranks_column(tmp_path: Path) -> None:
    topo = ScenarioTopology(nodes=2, procs_per_node=2, mesh=(("dp", 2), ("tp", 2)))
    scenario = Scenario(name="x", path="x.toml", trainer="dp_tp", topology=topo, resume_topology=topo,
                        run=RunSpec(), components=(ComponentSpec("rng", "per_rank"),))
    manifest = _fake_checkpoint(tmp_path, scenario)
    comp = manifest["components"]["rng"]  # type: ignore[index]
    files = comp.pop("files")
    comp["file_table"] = {name: [f[name] for f in files] for name in ("path", "ranks", "writer", "size_bytes")}
    (tmp_path / oracle.MANIFEST).write_text(json.dumps(manifest))
    assert oracle.check_checkpoint(str(tmp_path), scenario) == []
    del comp["file_table"]["ranks"]  # one file per replica set: format 1.4 leaves the column out
    comp["file_table"]["writer"][1] = 0
    (tmp_path / oracle.MANIFEST).write_text(json.dumps(manifest))
    assert oracle.check_checkpoint(str(tmp_path), scenario) == ["rng: rng/rank-00001.safetensors writer is 0, oracle says 1"]
