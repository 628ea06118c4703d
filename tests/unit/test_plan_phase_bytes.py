"""What one rank receives in a save's plan phase, counted in pickled bytes, for synthetic large worlds.

Rank 0 runs the real plan phase (:func:`distckpt.saving.plan`); its comm hands
it every peer's contribution, built the way the peer would build it (its own
compact report, for its own node and groups), and counts what arrives.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from distckpt import StateComponent
from distckpt.planning import local_report
from distckpt.saving import States, plan
from tests.helpers import Box

PP, TP, PER_NODE = 4, 8, 8


def groups_of(rank: int, world: int) -> dict[str, tuple[int, ...]]:
    """A DP x PP x TP mesh (TP innermost) and the model-parallel group of each DP replica."""
    dp = world // (PP * TP)
    d, rest = divmod(rank, PP * TP)
    p, t = divmod(rest, TP)
    return {
        "dp": tuple((x * PP + p) * TP + t for x in range(dp)),
        "pp": tuple((d * PP + x) * TP + t for x in range(PP)),
        "tp": tuple((d * PP + p) * TP + x for x in range(TP)),
        "mp": tuple(range(d * PP * TP, (d + 1) * PP * TP)),
    }


def components() -> list[StateComponent]:
    state = {"w": torch.zeros(64)}
    return [StateComponent("model", Box(state), "per_group", process_group_name="dp"),
            StateComponent("optimizer", Box(state), "per_group", process_group_name="dp"),
            StateComponent("dataloader", Box(state), "per_group", process_group_name="mp"),
            StateComponent("rng", Box(state), "per_rank"),
            StateComponent("scheduler", Box(state), "replicated"),
            StateComponent("cache", Box(state), "per_node")]


class CountingComm:
    """Rank 0 of a world whose peers send what they would send; counts the bytes rank 0 receives."""

    rank = 0

    def __init__(self, world: int, comps: list[StateComponent]) -> None:
        self.world_size = world
        self.comps = comps
        self.received = 0

    def node_id(self) -> str:
        return "host-00000"

    def group_members(self, group: Any) -> tuple[int, ...]:
        return groups_of(0, self.world_size)[group]

    def peer_report(self, rank: int) -> bytes:
        return local_report(f"host-{rank // PER_NODE:05d}", groups_of(rank, self.world_size), self.comps)

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        assert phase == "plan"
        if obj[-1][0] is not None:  # the reports (the round carrying the call's arguments): each peer's own
            gathered = [obj] + [(obj[0], self.peer_report(r), *obj[2:]) for r in range(1, self.world_size)]
        else:  # the plan digests: every peer counted as sending rank 0's part counts, as a set's lowest rank does
            gathered = [obj] * self.world_size
        self.received += sum(len(pickle.dumps(o)) for o in gathered)
        return gathered

    def broadcast(self, obj: Any, phase: str) -> Any:
        self.received += len(pickle.dumps(obj))
        return obj


def run_plan_phase(comm: CountingComm, world: int) -> None:
    """Rank 0's plan phase of a save of :func:`components` over ``comm`` (the other ranks' parts
    of each collective are what ``comm`` builds); checks the plan came out whole."""
    comps = comm.comps

    def report(full: bool = False) -> Any:
        return local_report(comm.node_id(), groups_of(0, world), comps, full)

    allocation = {"path": "/nowhere/1", "staging": "/nowhere/.1", "checkpoint_id": "1", "sequence": 1,
                  "timestamp": "2026-01-01T00:00:00Z"}
    result = plan(comm, comps, report, States({c.key: c for c in comps}),  # type: ignore[arg-type]
                  allocate=lambda create: allocation, min_part_bytes=64, hook=lambda phase: None,
                  args={"checkpoint_id": None})
    # the plan itself is whole: 256 bytes of state in parts of >= 64 bytes, so 4 parts per replica set
    assert len(result.components["model"].files) == PP * TP * 4
    assert len(result.components["cache"].files) == world // PER_NODE * 4


def received_in_plan_phase(world: int) -> int:
    comm = CountingComm(world, components())
    run_plan_phase(comm, world)
    print(world, comm.received, comm.received / world)
    return comm.received


@pytest.mark.timeout(120)
def test_what_a_rank_receives_in_the_plan_phase_grows_linearly_and_stays_under_2_mib_at_16384() -> None:
    small, large = received_in_plan_phase(1024), received_in_plan_phase(16384)
    per_rank_small, per_rank_large = small / 1024, large / 16384
    assert per_rank_large <= per_rank_small * 1.05  # linear: the same bytes per peer
    assert large <= 2 * 1024 * 1024


def mesh_reports(world: int, tp: int, change: dict[int, dict[str, tuple[int, ...]]]) -> tuple[list[Any], list[Any]]:
    groups = [{"dp": tuple(range(r % tp, world, tp)), "tp": tuple(range(r - r % tp, r - r % tp + tp))}
              for r in range(world)]
    for rank, g in change.items():
        groups[rank] = {**groups[rank], **g}
    comps = components()[:1]
    return ([local_report(f"n{r // 4}", g, comps) for r, g in enumerate(groups)],
            [local_report(f"n{r // 4}", g, comps, full=True) for r, g in enumerate(groups)])


def test_compact_reports_of_a_consistent_mesh_give_the_topology_of_the_member_lists() -> None:
    from distckpt.planning import agree
    from distckpt.topology import Topology

    compact, full = mesh_reports(16, 4, {})
    expected = Topology.from_reports([r["node"] for r in full], [r["groups"] for r in full])
    assert agree(compact, names=["dp", "tp"]) == expected


def test_a_rank_passing_other_members_is_named_from_compact_reports_and_again_from_member_lists() -> None:
    from distckpt.errors import TopologyMismatchError
    from distckpt.planning import agree

    compact, full = mesh_reports(8, 2, {3: {"dp": (1, 3, 5)}})  # rank 3 forgets rank 7
    with pytest.raises(TopologyMismatchError, match=r"ranks \[3\] passed other members"):
        agree(compact, names=["dp", "tp"])
    asked = []
    with pytest.raises(TopologyMismatchError, match="process group 'dp'"):
        agree(compact, lambda: asked.append(1) or full, names=["dp", "tp"])  # type: ignore[func-returns-value]
    assert asked == [1]


def test_reports_of_ranks_without_groups_decode_at_once_as_zero_width_rows() -> None:
    from distckpt.planreports import _varint_matrix, decode_reports

    reports = [local_report(f"n{r}", {}, components()[:1]) for r in range(5)]
    _, values = _varint_matrix(reports)
    assert values is not None and values.shape == (5, 0)  # not the one-by-one fallback
    nodes, labels, _, parts = decode_reports(reports, [])
    assert labels == [()] * 5 and parts == [()] * 5 and len(set(nodes)) == 5
