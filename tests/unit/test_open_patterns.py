"""Open sharing patterns: the Pattern protocol, the registry, joins, manifest 1.2 and older manifests."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import distckpt
from distckpt import (
    CheckpointCoordinator,
    CheckpointManifest,
    ComponentMismatchError,
    ManifestError,
    Pattern,
    SharingPattern,
    StateComponent,
    Topology,
    TopologyMismatchError,
    register_pattern,
    registered_patterns,
)
from distckpt.cli import main as cli_main
from distckpt.patterns import Global, PerGroup, PerNode, PerRank, Replicated, pattern_from_record
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, mesh_groups, threads

SRC = Path(distckpt.__file__).parent


@register_pattern
@dataclass(frozen=True, eq=False)
class EveryKth(Pattern):
    """Ranks congruent modulo ``k`` share state (a test pattern with a parameter)."""

    kind = "test_every_kth"
    k: int = 2

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [range(i, topology.world_size, self.k) for i in range(min(self.k, topology.world_size))]


def test_a_topology_is_built_from_plain_data_with_nodes_of_different_sizes() -> None:
    topo = Topology(nodes=[[0, 1, 2], [3, 4]], groups={"dp": [[0, 3], [1, 4], [2]]})
    assert topo.world_size == 5 and topo.nodes == ((0, 1, 2), (3, 4))
    assert [topo.node_of(r) for r in range(5)] == [0, 0, 0, 1, 1]
    assert [topo.local_rank(r) for r in range(5)] == [0, 1, 2, 0, 1]
    assert topo.groups["dp"] == ((0, 3), (1, 4), (2,))
    assert Topology(3).nodes == ((0, 1, 2),)


def test_builtin_patterns_are_registered_classes_and_the_enum_names_alias_them() -> None:
    kinds = registered_patterns()
    assert {k: kinds[k] for k in ("global", "replicated", "per_rank", "per_node", "per_group")} == {
        "global": Global, "replicated": Replicated, "per_rank": PerRank, "per_node": PerNode, "per_group": PerGroup}
    assert SharingPattern.PER_GROUP.pattern("dp") == PerGroup("dp")
    assert SharingPattern.REPLICATED.pattern() == Replicated()
    assert PerGroup("dp").params() == {"groups": ["dp"]} and PerGroup(**PerGroup("pp", "tp").params()) == PerGroup("pp", "tp")


def test_per_group_with_several_names_is_the_join_of_their_partitions_on_a_3d_mesh() -> None:
    dims = (("dp", 2), ("pp", 2), ("tp", 2))
    groups = {name: sorted({mesh_groups(r, dims)[name] for r in range(8)}) for name, _ in dims}
    topo = Topology(nodes=[[0, 1, 2, 3], [4, 5, 6, 7]], groups=groups)
    assert PerGroup("pp", "tp").partition(topo) == ((0, 1, 2, 3), (4, 5, 6, 7))  # one set per dp coordinate
    assert PerGroup("dp", "tp").partition(topo) == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert PerGroup("tp").partition(topo) == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_a_declaration_takes_a_pattern_object_an_alias_or_a_registered_kind() -> None:
    by_object = StateComponent("m", Box(), PerGroup("dp"))
    by_alias = StateComponent("m", Box(), SharingPattern.PER_GROUP, process_group_name="dp")
    by_kind = StateComponent("m", Box(), "test_every_kth")
    assert by_object.pattern == by_alias.pattern == PerGroup("dp")
    assert by_object.sharing_pattern is SharingPattern.PER_GROUP and by_object.process_group_name == "dp"
    assert by_kind.pattern == EveryKth(2) and StateComponent("m", Box(), EveryKth(3)).pattern == EveryKth(3)
    joined = StateComponent("d", Box(), PerGroup("pp", "tp"), validate_replication=True)
    assert joined.sharing_pattern == PerGroup("pp", "tp") and joined.process_group_name is None
    with pytest.raises(ValueError, match="sharing_pattern"):
        StateComponent("m", Box(), "no_such_kind")


def test_registering_a_kind_twice_with_another_class_or_a_bad_kind_is_refused() -> None:
    class Other(Pattern):
        kind = "test_every_kth"

        def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
            return [range(topology.world_size)]

    with pytest.raises(ValueError, match="already registered"):
        register_pattern(Other)
    Other.kind = "Bad-Kind"
    with pytest.raises(ValueError, match=re.escape("[a-z][a-z0-9_]")):
        register_pattern(Other)
    assert register_pattern(EveryKth) is EveryKth  # the same class again is fine


def test_a_pattern_whose_sets_do_not_partition_the_world_fails_every_rank_and_writes_nothing(tmp_path: Path) -> None:
    @register_pattern
    class Overlapping(Pattern):
        kind = "test_overlapping"

        def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
            return [range(topology.world_size), [0]]

    def fn(comm: ThreadComm) -> None:
        CheckpointCoordinator([StateComponent("x", Box({"a": 1}), Overlapping())], dist=comm,
                              output_dir=tmp_path).save_checkpoint()

    results = threads(3, fn)
    assert all(isinstance(r, TopologyMismatchError) and "test_overlapping" in str(r) and "rank 0" in str(r)
               for r in results), results
    assert not (tmp_path / "checkpoints").exists() or list((tmp_path / "checkpoints").iterdir()) == []


def test_a_pattern_that_answers_differently_on_some_rank_fails_every_rank(tmp_path: Path) -> None:
    calls: list[int] = []

    @register_pattern
    class Moody(Pattern):
        """The first rank to ask gets one set per rank, every later one a single set."""

        kind = "test_moody"

        def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
            calls.append(1)
            return [[r] for r in range(topology.world_size)] if len(calls) == 1 else [range(topology.world_size)]

    def fn(comm: ThreadComm) -> None:
        CheckpointCoordinator([StateComponent("x", Box({"a": 1}), Moody())], dist=comm,
                              output_dir=tmp_path).save_checkpoint()

    results = threads(2, fn)
    assert all(isinstance(r, TopologyMismatchError) and r.failures == {1: "planned different files than rank 0"}
               for r in results), results


def save_and_load(tmp_path: Path, pattern: Any, world: int = 4) -> tuple[str, list[Any]]:
    def save(comm: ThreadComm) -> str:
        return CheckpointCoordinator([StateComponent("x", Box({"w": torch.full((3,), float(comm.rank % 2))}), pattern)],
                                     dist=comm, output_dir=tmp_path).save_checkpoint()

    path = all_ok(threads(world, save))[0]

    def load(comm: ThreadComm) -> Any:
        box = Box()
        CheckpointCoordinator([StateComponent("x", box, pattern)], dist=comm, output_dir=tmp_path).load_checkpoint()
        return box.state

    return path, all_ok(threads(world, load))


def test_manifest_1_2_records_the_pattern_kind_and_params_and_a_custom_pattern_round_trips(tmp_path: Path) -> None:
    path, states = save_and_load(tmp_path, EveryKth(2))
    raw = json.loads((Path(path) / "manifest.json").read_text())
    comp = raw["components"]["x"]
    assert raw["format_version"] == "1.3"
    assert comp["pattern"] == {"kind": "test_every_kth", "params": {"k": 2}} and comp["sharing_pattern"] == "test_every_kth"
    assert comp["replicated_across"] == [[0, 2], [1, 3]]
    assert sorted(p.name for p in (Path(path) / "x").iterdir()) == ["test_every_kth-000.safetensors",
                                                                     "test_every_kth-001.safetensors"]
    assert [float(s["w"][0]) for s in states] == [0.0, 1.0, 0.0, 1.0]


def test_a_checkpoint_in_the_1_1_format_still_loads(tmp_path: Path) -> None:
    path, _ = save_and_load(tmp_path, SharingPattern.PER_NODE, world=2)
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["format_version"] = "1.1"
    for comp in raw["components"].values():
        del comp["pattern"]
    manifest.write_text(json.dumps(raw))
    parsed = CheckpointManifest.load(path)
    assert parsed.components["x"].kind == "per_node" and parsed.components["x"].params == {}
    _, states = save_and_load(tmp_path / "again", SharingPattern.PER_NODE, world=2)
    assert len(states) == 2

    def load(comm: ThreadComm) -> Any:
        box = Box()
        CheckpointCoordinator([StateComponent("x", box, "per_node")], dist=comm, output_dir=tmp_path).load_checkpoint(path)
        return box.state

    assert [float(s["w"][0]) for s in all_ok(threads(2, load))] == [0.0, 0.0]


def test_loading_a_checkpoint_of_an_unregistered_kind_says_which_module_to_import(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path, _ = save_and_load(tmp_path, EveryKth(2), world=2)
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["components"]["x"]["pattern"]["kind"] = raw["components"]["x"]["sharing_pattern"] = "not_imported_here"
    manifest.write_text(json.dumps(raw))

    def load(comm: ThreadComm) -> None:
        CheckpointCoordinator([StateComponent("x", Box(), EveryKth(2))], dist=comm, output_dir=tmp_path).load_checkpoint()

    results = threads(2, load)
    assert all(isinstance(r, ManifestError) and "'not_imported_here' is not registered" in str(r)
               and "import the module" in str(r) for r in results), results
    for command in (["inspect", path], ["verify", path], ["diff", path, path]):
        capsys.readouterr()
        code = cli_main(command)
        out = capsys.readouterr().out
        assert code == 0 and (command[0] != "inspect" or "not_imported_here" in out), out


def test_a_pattern_declared_with_other_params_than_saved_is_refused(tmp_path: Path) -> None:
    save_and_load(tmp_path, EveryKth(2), world=2)

    def load(comm: ThreadComm) -> None:
        CheckpointCoordinator([StateComponent("x", Box(), EveryKth(3))], dist=comm, output_dir=tmp_path).load_checkpoint()

    results = threads(2, load)
    assert all(isinstance(r, ComponentMismatchError) and 'test_every_kth(k=2)' in str(r) for r in results), results


def test_pattern_from_record_rebuilds_registered_kinds_and_names_unknown_ones() -> None:
    assert pattern_from_record("per_group", {"groups": ["pp", "tp"]}) == PerGroup("pp", "tp")
    with pytest.raises(LookupError, match="'nope' is not registered"):
        pattern_from_record("nope", {})


def test_no_module_of_the_library_branches_on_a_builtin_pattern() -> None:
    for path in SRC.rglob("*.py"):
        if path.name == "patterns.py":
            continue
        text = path.read_text()
        assert "SharingPattern." not in text, path


def test_one_pattern_file_imported_under_two_module_names_registers_once_without_conflict() -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "examples" / "patterns" / "per_local_rank.py"
    classes = []
    for name in ("kit_copy_a", "kit_copy_b"):
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        classes.append(module.PerLocalRank)
    assert classes[0] is not classes[1]
    assert StateComponent("m", Box(), classes[1]()).pattern == classes[0]()
