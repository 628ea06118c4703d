from __future__ import annotations

import pytest

from distckpt import SharingPattern, TopologyMismatchError
from distckpt.layout import check_relpath, plan_component
from distckpt.patterns import PerGroup
from distckpt.topology import Topology


def dp_tp(dp: int, tp: int) -> Topology:
    world = dp * tp
    return Topology(
        world,
        nodes=[tuple(range(0, world // 2)), tuple(range(world // 2, world))],
        groups={
            "dp": [tuple(t + tp * i for i in range(dp)) for t in range(tp)],
            "tp": [tuple(d * tp + j for j in range(tp)) for d in range(dp)],
        },
    )


def test_dp_x_tp_model_per_dp_group_has_one_writer_per_tp_shard() -> None:
    plan = plan_component(dp_tp(2, 4), "model", SharingPattern.PER_GROUP, "dp")
    assert plan.writers == (0, 1, 2, 3)
    assert plan.replica_sets == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert [f.path for f in plan.files] == [f"model/dp-00{i}.safetensors" for i in range(4)]


def test_dp_x_tp_dataset_per_tp_group_is_written_by_ranks_0_and_4() -> None:
    plan = plan_component(dp_tp(2, 4), "dataset", SharingPattern.PER_GROUP, "tp")
    assert plan.writers == (0, 4)


@pytest.mark.parametrize(
    ("pattern", "paths"),
    [
        (SharingPattern.GLOBAL, ["k/global.safetensors"]),
        (SharingPattern.REPLICATED, ["k/replicated.safetensors"]),
        (SharingPattern.PER_RANK, [f"k/rank-0000{r}.safetensors" for r in range(8)]),
        (SharingPattern.PER_NODE, ["k/node-000.safetensors", "k/node-001.safetensors"]),
    ],
)
def test_file_names_follow_the_on_disk_format(pattern: SharingPattern, paths: list[str]) -> None:
    assert [f.path for f in plan_component(dp_tp(2, 4), "k", pattern, None).files] == paths


def test_per_node_writers_are_the_lowest_rank_of_each_node() -> None:
    topo = Topology(4, nodes=[(1, 3), (0, 2)])
    plan = plan_component(topo, "cache", SharingPattern.PER_NODE, None)
    assert plan.writers == (0, 1)
    assert plan.replica_sets == ((0, 2), (1, 3))


def test_overlapping_groups_are_rejected_naming_the_group_and_rank() -> None:
    with pytest.raises(TopologyMismatchError, match=r"'dp'.*rank 1"):
        Topology(4, nodes=[(0, 1, 2, 3)], groups={"dp": [(0, 1), (1, 2, 3)]})


def test_groups_that_miss_ranks_are_rejected() -> None:
    with pytest.raises(TopologyMismatchError, match=r"ranks \[3\]"):
        Topology(4, nodes=[(0, 1, 2, 3)], groups={"dp": [(0, 1), (2,)]})


def test_reports_that_disagree_about_a_group_are_rejected() -> None:
    with pytest.raises(TopologyMismatchError, match="'dp'"):
        Topology.from_reports(["a", "a"], [{"dp": (0, 1)}, {"dp": (1,)}])


def test_reports_build_nodes_from_node_ids_in_rank_order() -> None:
    topo = Topology.from_reports(["n1", "n0", "n1", "n0"], [{}, {}, {}, {}])
    assert topo.nodes == ((0, 2), (1, 3))
    assert topo.node_index(3) == 1


def test_per_group_with_an_unknown_group_says_which_groups_exist() -> None:
    with pytest.raises(TopologyMismatchError, match="known: dp, tp"):
        PerGroup("pp").partition(dp_tp(2, 2))


@pytest.mark.parametrize("bad", ["../x/y", "a/../b", "/abs/x", "a", "a/b/c", "a/.", "a\\b/c", "a/"])
def test_manifest_paths_that_could_escape_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        check_relpath(bad)


def _mesh_groups(world: int, tp: int) -> list[dict[str, tuple[int, ...]]]:
    return [{"dp": tuple(range(r % tp, world, tp)), "tp": tuple(range(r - r % tp, r - r % tp + tp))}
            for r in range(world)]


def test_compact_reports_give_the_same_topology_as_member_lists() -> None:
    from distckpt.topology import group_key

    groups = _mesh_groups(16, 4)
    nodes = [f"n{r // 8}" for r in range(16)]
    keys = [{name: group_key(members) for name, members in g.items()} for g in groups]
    assert Topology.from_compact(nodes, keys) == Topology.from_reports(nodes, groups)


def test_a_rank_passing_other_members_is_refused_with_compact_reports() -> None:
    from distckpt.topology import group_key

    groups = _mesh_groups(8, 2)
    groups[3] = {**groups[3], "dp": (1, 3, 5)}  # rank 3 forgets rank 7
    keys = [{name: group_key(members) for name, members in g.items()} for g in groups]
    with pytest.raises(TopologyMismatchError, match="process group 'dp'"):
        Topology.from_compact([f"n{r}" for r in range(8)], keys)


def test_what_a_rank_reports_in_the_plan_phase_does_not_grow_with_its_groups() -> None:
    import pickle

    from distckpt import StateComponent
    from distckpt.planning import local_report
    from tests.helpers import Box

    comps = [StateComponent(k, Box({}), "per_group", process_group_name="dp") for k in ("model", "optim")]
    small = local_report("host-1", {"dp": tuple(range(4)), "tp": (0, 1)}, comps)
    large = local_report("host-1", {"dp": tuple(range(0, 65536, 8)), "tp": tuple(range(8))}, comps)
    assert len(pickle.dumps(small)) == len(pickle.dumps(large)) < 128
    assert local_report("host-1", {"dp": (0, 1)}, comps, full=True)["groups"] == {"dp": (0, 1)}
