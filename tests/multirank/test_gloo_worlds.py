"""Real multi-process gloo worlds: every pattern, the DP x TP acceptance layout, failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distckpt import CollectiveTimeoutError, CrossRankError, ReplicationMismatchError
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.multirank import ranks

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(180)]

SHAPES = [
    (1, 1, [("dp", 1)]),
    (1, 2, [("dp", 2)]),
    (2, 2, [("dp", 2), ("tp", 2)]),
    (2, 4, [("dp", 2), ("tp", 4)]),
    (2, 4, [("dp", 2), ("pp", 2), ("tp", 2)]),
]


@pytest.mark.parametrize(("nodes", "procs", "dims"), SHAPES, ids=lambda v: str(v))
def test_every_pattern_saves_without_hanging_and_loads_bit_exact(pool: WorldPool, tmp_path: Path, nodes: int, procs: int, dims: list) -> None:
    results = pool.run_ok(WorldSpec(nodes=nodes, procs_per_node=procs, workdir=tmp_path), ranks.every_pattern, dims, False, timeout=120)
    world = nodes * procs
    assert all(r["exact"] for r in results)
    first = results[0]
    assert first["nodes"] == [list(range(n * procs, (n + 1) * procs)) for n in range(nodes)]
    assert first["writers"]["global"] == [0] and first["writers"]["replicated"] == [0]
    assert first["writers"]["per_rank"] == list(range(world))
    assert first["writers"]["per_node"] == [n * procs for n in range(nodes)]
    for rank, r in enumerate(results):
        assert r["files"]["per_rank"] == f"per_rank/rank-{rank:05d}.safetensors"
        assert r["files"]["per_node"] == f"per_node/node-{rank // procs:03d}.safetensors"
    files = {os.path.relpath(os.path.join(d, f), first["path"])
             for d, _, fs in os.walk(first["path"]) for f in fs}
    expected = {"manifest.json", "global/global.safetensors", "replicated/replicated.safetensors"}
    expected |= {f"per_rank/rank-{r:05d}.safetensors" for r in range(world)}
    expected |= {f"per_node/node-{n:03d}.safetensors" for n in range(nodes)}
    for name, _ in dims:
        expected |= {f"group_{name}/{name}-{i:03d}.safetensors" for i in range(len(first["sets"][f"group_{name}"]))}
    assert files == expected


def test_a_device_mesh_names_the_groups(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.every_pattern, [("dp", 2), ("tp", 2)], True, timeout=120)
    assert all(r["exact"] for r in results)
    assert results[0]["writers"]["group_dp"] == [0, 1] and results[0]["writers"]["group_tp"] == [0, 2]


def test_dp_x_tp_2x4_writes_one_file_per_shard_and_restores_every_rank(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=4, workdir=tmp_path), ranks.dp_tp, None, timeout=120)
    assert all(r["exact"] for r in results)
    assert results[0]["model"] == [0, 1, 2, 3] and results[0]["dataset"] == [0, 4]


def test_perturbing_rank_5s_shard_fails_every_rank_naming_ranks_1_and_5(pool: WorldPool, tmp_path: Path) -> None:
    outcomes = pool.run(WorldSpec(nodes=2, procs_per_node=4, workdir=tmp_path), ranks.dp_tp, 5, timeout=120)
    assert not any(o.ok for o in outcomes)
    assert all(isinstance(o.exception, ReplicationMismatchError) for o in outcomes)
    messages = {str(o.exception) for o in outcomes}
    assert len(messages) == 1
    assert "[1] | [5]" in messages.pop()
    assert all(o.exception.failures.keys() == {5} for o in outcomes)


def test_rank_failure_during_write_fails_every_rank(pool: WorldPool, tmp_path: Path) -> None:
    outcomes = pool.run(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.fail_or_die_in_write, 3, "raise", timeout=60)
    assert all(isinstance(o.exception, CrossRankError) for o in outcomes)
    assert all(o.exception.failures.keys() == {3} and "No space left" in o.exception.failures[3] for o in outcomes)


def test_a_rank_killed_during_write_makes_survivors_raise_naming_it(pool: WorldPool, tmp_path: Path) -> None:
    outcomes = pool.run(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.fail_or_die_in_write, 2, "kill", timeout=90)
    assert outcomes[2].exit_code == -9
    for o in (outcomes[0], outcomes[1], outcomes[3]):
        assert isinstance(o.exception, CollectiveTimeoutError), o.describe()
        assert 2 in o.exception.failures


def test_a_rank_dead_before_connecting_is_named_by_every_survivors_coordinator_within_its_timeout(
        pool: WorldPool, tmp_path: Path) -> None:
    outcomes = pool.run(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.die_before_connecting, 2,
                        timeout=60)
    assert outcomes[2].exit_code == -9
    for o in (outcomes[0], outcomes[1], outcomes[3]):
        assert isinstance(o.exception, CollectiveTimeoutError), o.describe()
        assert o.exception.phase == "connect" and set(o.exception.failures) == {2}, o.describe()


def test_per_node_writers_come_from_group_rank_when_local_rank_is_unset(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=3, workdir=tmp_path), ranks.per_node_without_local_rank, timeout=60)
    assert results == [[0, 3]] * 6


def test_an_async_save_on_gloo_commits_the_snapshot_while_training_goes_on(pool: WorldPool, tmp_path: Path) -> None:
    assert pool.run_ok(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.async_then_mutate, timeout=90) == [True] * 4


def test_balanced_writes_and_read_and_broadcast_loads_are_bit_exact_on_gloo(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), ranks.balanced_then_broadcast,
                          timeout=120)
    assert all(r["exact"] == {"read_and_broadcast": True, "every_member_reads": True} for r in results), results
    parts = results[0]["parts"]
    assert parts["replicated"] == [(0, 0, 4), (2, 1, 4), (1, 2, 4), (3, 3, 4)]  # node by node
    assert parts["group_dp"] == [(0, 0, 2), (2, 1, 2), (1, 0, 2), (3, 1, 2)]
    assert parts["per_node"] == [(0, 0, 2), (1, 1, 2), (2, 0, 2), (3, 1, 2)] and len(parts["per_rank"]) == 4


def test_all_gather_carries_payloads_in_slots_and_falls_back_for_a_large_one(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=1, procs_per_node=3, workdir=tmp_path), ranks.gathers_of_every_size, timeout=60)
    expected = [[{"rank": r} for r in range(3)], [11, 100_001, 11], ["0", "1", "2"], [0, 2, 4]]
    assert results == [expected] * 3


def test_broadcast_carries_a_payload_in_one_slot_and_falls_back_for_a_large_one(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=1, procs_per_node=3, workdir=tmp_path), ranks.broadcasts_of_every_size, timeout=60)
    assert results == [[{"from": 0}, 50_000, 49_999, 0]] * 3
