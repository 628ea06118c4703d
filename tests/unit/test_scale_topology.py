"""The array path from compact reports to a topology gives what the per-rank path gave.

:func:`distckpt.planning.agree` decodes every report at once and builds the
topology with one stable sort per group name
(:meth:`~distckpt.topology.Topology.from_label_arrays`); these tests compare it
with the member lists themselves (:meth:`Topology.from_reports`) and with the
reports decoded one by one.
"""

from __future__ import annotations

import random

import pytest

from distckpt import StateComponent, Topology, TopologyMismatchError
from distckpt.planning import agree, decode_reports, local_report, with_parts
from distckpt.planreports import HEAD as _HEAD
from distckpt.planreports import _varints
from tests.helpers import Box


def mesh(world: int, tp: int, per_node: int, seed: int) -> tuple[list[str], list[dict[str, tuple[int, ...]]]]:
    """A dp x tp mesh over a shuffled rank order (groups are not runs of ranks), nodes of ``per_node``."""
    order = list(range(world))
    random.Random(seed).shuffle(order)
    groups: list[dict[str, tuple[int, ...]]] = [{} for _ in range(world)]
    for i, rank in enumerate(order):
        row, col = divmod(i, tp)
        groups[rank] = {"tp": tuple(sorted(order[row * tp:(row + 1) * tp])),
                        "dp": tuple(sorted(order[col::tp]))}
    return [f"host-{r // per_node}" for r in range(world)], groups


COMPONENTS = [StateComponent("model", Box({}), "per_group", process_group_name="dp")]


@pytest.mark.parametrize(("world", "tp", "per_node", "seed"), [(1, 1, 1, 0), (12, 3, 4, 1), (300, 5, 7, 2),
                                                                 (1024, 8, 8, 3)])
def test_compact_reports_give_the_topology_of_the_member_lists(world: int, tp: int, per_node: int, seed: int) -> None:
    nodes, groups = mesh(world, tp, per_node, seed)
    reports = [local_report(nodes[r], groups[r], COMPONENTS) for r in range(world)]
    topology = agree(reports, names=["dp", "tp"])
    expected = Topology.from_reports(nodes, groups)
    assert topology == expected
    assert [topology.node_of(r) for r in range(world)] == [expected.node_of(r) for r in range(world)]
    assert Topology.from_leaders(nodes, ["dp", "tp"], [[min(g["dp"]), min(g["tp"])] for g in groups],
                                 decode_reports(reports, ["dp", "tp"])[2]) == expected


@pytest.mark.parametrize("ragged", [False, True])
def test_reports_decoded_at_once_equal_reports_decoded_one_by_one(ragged: bool) -> None:
    rng = random.Random(7)
    world = 500
    nodes, groups = mesh(world, 5, 10, 4)
    reports = []
    for r in range(world):
        parts = [rng.choice([0, 1, 127, 128, 300, 2**20, 2**40]) for _ in range(3 + (r % 3 if ragged else 0))]
        reports.append(with_parts(local_report(nodes[r], groups[r], COMPONENTS), parts))
    got = decode_reports(reports, ["dp", "tp"])
    one_by_one = [_varints(rep, _HEAD.size) for rep in reports]
    assert [tuple(x) for x in got[1]] == [v[:2] for v in one_by_one]
    assert [tuple(x) for x in got[3]] == [v[2:] for v in one_by_one]
    assert got[0] == [_HEAD.unpack_from(rep)[1] for rep in reports]
    assert got[2] == [_HEAD.unpack_from(rep)[2] for rep in reports]


@pytest.mark.parametrize("odd", [0, 5, 299])
def test_a_rank_passing_other_members_is_named_by_the_array_path(odd: int) -> None:
    nodes, groups = mesh(300, 5, 7, 2)
    members = groups[odd]["dp"]
    groups[odd] = {**groups[odd], "dp": tuple(r for r in members if r == odd or r != max(set(members) - {odd}))}
    reports = [local_report(nodes[r], groups[r], COMPONENTS) for r in range(300)]
    with pytest.raises(TopologyMismatchError, match=rf"ranks \[{odd}\] passed other members"):
        agree(reports, names=["dp", "tp"])


def test_a_group_name_that_is_not_a_safe_name_is_refused_by_the_array_path_as_by_the_constructor() -> None:
    nodes, groups = mesh(4, 2, 2, 0)
    renamed = [{"bad name": g["dp"], "tp": g["tp"]} for g in groups]
    reports = [local_report(nodes[r], renamed[r], COMPONENTS) for r in range(4)]
    with pytest.raises(ValueError, match="not a safe name"):
        Topology(4, groups={"bad name": [g["dp"] for g in groups[:2]]})
    with pytest.raises(ValueError, match="not a safe name"):
        agree(reports, names=["bad name", "tp"])
