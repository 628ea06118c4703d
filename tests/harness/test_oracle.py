"""The oracle's reading of the design: replica sets, writers and file names from topology alone."""

from __future__ import annotations

from harness.oracle import expected_component, mesh_groups, node_groups, replica_sets
from harness.scenario import ComponentSpec, Topology

DP_TP_2x4 = Topology(nodes=2, procs_per_node=4, mesh=(("dp", 2), ("tp", 4)))


def test_dp_by_tp_groups_follow_the_design_example() -> None:
    assert mesh_groups(DP_TP_2x4, "dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert mesh_groups(DP_TP_2x4, "tp") == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_a_three_dimensional_mesh_is_row_major() -> None:
    topo = Topology(nodes=1, procs_per_node=8, mesh=(("a", 2), ("b", 2), ("c", 2)))
    assert mesh_groups(topo, "c") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert mesh_groups(topo, "b") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert mesh_groups(topo, "a") == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_patterns_give_their_replica_sets() -> None:
    topo = Topology(nodes=2, procs_per_node=2)
    assert replica_sets(topo, "global", None) == ((0, 1, 2, 3),)
    assert replica_sets(topo, "replicated", None) == ((0, 1, 2, 3),)
    assert replica_sets(topo, "per_rank", None) == ((0,), (1,), (2,), (3,))
    assert replica_sets(topo, "per_node", None) == node_groups(topo) == ((0, 1), (2, 3))


def test_files_and_writers_of_each_pattern() -> None:
    model = expected_component(DP_TP_2x4, ComponentSpec("model", "per_group", "dp"))
    assert model.writers == (0, 1, 2, 3)
    assert [f.path for f in model.files] == [f"model/dp-00{i}.safetensors" for i in range(4)]
    assert model.files[1].ranks == (1, 5)
    data = expected_component(DP_TP_2x4, ComponentSpec("dataset", "per_group", "tp"))
    assert data.writers == (0, 4)
    rng = expected_component(DP_TP_2x4, ComponentSpec("rng", "per_rank"))
    assert rng.files[5].path == "rng/rank-00005.safetensors"
    cache = expected_component(DP_TP_2x4, ComponentSpec("cache", "per_node"))
    assert [(f.path, f.writer) for f in cache.files] == [
        ("cache/node-000.safetensors", 0),
        ("cache/node-001.safetensors", 4),
    ]
    sched = expected_component(DP_TP_2x4, ComponentSpec("scheduler", "replicated"))
    assert [(f.path, f.ranks) for f in sched.files] == [
        ("scheduler/replicated.safetensors", tuple(range(8)))
    ]


def test_balanced_parts_are_written_node_by_node_from_each_nodes_lowest_rank() -> None:
    model = expected_component(DP_TP_2x4, ComponentSpec("model", "per_group", "dp"), parts=2)
    assert [(f.path, f.writer) for f in model.files[:2]] == [
        ("model/dp-000.part-000-of-002.safetensors", 0),
        ("model/dp-000.part-001-of-002.safetensors", 4),
    ]
    assert model.writers == tuple(range(8)) and model.replica_sets == ((0, 4), (1, 5), (2, 6), (3, 7))
    data = expected_component(DP_TP_2x4, ComponentSpec("dataset", "per_group", "tp"), parts=2)
    assert [(f.path, f.writer) for f in data.files[:2]] == [
        ("dataset/tp-000.part-000-of-002.safetensors", 0), ("dataset/tp-000.part-001-of-002.safetensors", 1)]
    sched = expected_component(DP_TP_2x4, ComponentSpec("scheduler", "replicated"), parts=3)
    assert [f.writer for f in sched.files] == [0, 4, 1]  # node by node
