"""The warm world pool: environment, outcomes, faults, timeouts, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distckpt.testing import probes
from distckpt.testing.pool import RankContext, WorldPool, WorldSpec, WorldTimeout

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_an_eight_rank_world_all_reduces_and_every_rank_returns_its_value(
    world_pool: WorldPool,
) -> None:
    values = world_pool.run_ok(WorldSpec(nodes=2, procs_per_node=4), probes.all_reduce_rank)
    assert values == [28.0] * 8


@pytest.mark.timeout(120)
def test_every_rank_sees_the_environment_torchrun_would_give_it(world_pool: WorldPool) -> None:
    spec = WorldSpec(nodes=2, procs_per_node=3)
    envs = world_pool.run_ok(spec, probes.environment)
    run_ids = {e["TORCHELASTIC_RUN_ID"] for e in envs}
    ports = {e["MASTER_PORT"] for e in envs}
    assert len(run_ids) == 1 and len(ports) == 1
    for rank, env in enumerate(envs):
        node, local = divmod(rank, 3)
        assert env["RANK"] == str(rank) == env["ROLE_RANK"]
        assert env["LOCAL_RANK"] == str(local)
        assert env["WORLD_SIZE"] == "6" == env["ROLE_WORLD_SIZE"]
        assert env["LOCAL_WORLD_SIZE"] == "3"
        assert env["GROUP_RANK"] == str(node)
        assert env["GROUP_WORLD_SIZE"] == "2"
        assert env["ROLE_NAME"] == "default"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["NODE_RANK"] is None
        assert (env["dist_rank"], env["dist_world_size"], env["backend"]) == (rank, 6, "gloo")
        ctx: RankContext = env["ctx"]
        assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.node_rank) == (rank, 6, local, node)
        assert (ctx.nodes, ctx.procs_per_node) == (2, 3)


@pytest.mark.timeout(120)
def test_ranks_on_nodes_of_uneven_sizes_see_what_torchrun_gives_uneven_agents(
    world_pool: WorldPool,
) -> None:
    # torchrun numbers the workers agent by agent; LOCAL_WORLD_SIZE is the agent's own size.
    spec = WorldSpec(procs_per_node=(3, 2, 1))
    envs = world_pool.run_ok(spec, probes.environment)
    places = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    for rank, (env, (node, local)) in enumerate(zip(envs, places, strict=True)):
        assert env["RANK"] == str(rank) == env["ROLE_RANK"]
        assert (env["LOCAL_RANK"], env["GROUP_RANK"]) == (str(local), str(node))
        assert env["LOCAL_WORLD_SIZE"] == str((3, 2, 1)[node])
        assert (env["WORLD_SIZE"], env["GROUP_WORLD_SIZE"], env["ROLE_WORLD_SIZE"]) == ("6", "3", "6")
        ctx: RankContext = env["ctx"]
        assert (ctx.node_rank, ctx.local_rank, ctx.local_world_size) == (node, local, (3, 2, 1)[node])
        assert (ctx.nodes, ctx.procs_per_node) == (3, (3, 2, 1))


def test_a_world_spec_of_equal_node_sizes_is_the_same_as_one_size() -> None:
    assert WorldSpec(procs_per_node=(2, 2)) == WorldSpec(nodes=2, procs_per_node=2)
    assert WorldSpec(procs_per_node=[3, 1]).node_sizes == (3, 1)
    with pytest.raises(ValueError, match="lists 2 node sizes"):
        WorldSpec(nodes=3, procs_per_node=(3, 1))
    with pytest.raises(ValueError, match="positive ints"):
        WorldSpec(procs_per_node=(3, 0))


@pytest.mark.timeout(120)
def test_environment_changes_made_by_a_rank_are_undone_after_the_world(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=2)
    world_pool.run_ok(spec, probes.set_env_var, "HARNESS_LEAK", "1")
    assert world_pool.run_ok(spec, probes.read_env_var, "HARNESS_LEAK") == [None, None]
    assert world_pool.run_ok(spec, probes.read_env_var, "RANK") == ["0", "1"]


@pytest.mark.timeout(120)
def test_extra_environment_from_the_spec_reaches_every_rank(world_pool: WorldPool) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=2, env={"HARNESS_EXTRA": "x"})
    assert world_pool.run_ok(spec, probes.read_env_var, "HARNESS_EXTRA") == ["x", "x"]


@pytest.mark.timeout(120)
def test_a_warm_eight_rank_world_starts_in_under_a_second(world_pool: WorldPool) -> None:
    spec = WorldSpec(nodes=2, procs_per_node=4)
    world_pool.run_ok(spec, probes.all_reduce_rank)
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        world_pool.run_ok(spec, probes.all_reduce_rank)
        timings.append(time.perf_counter() - start)
    assert sorted(timings)[1] < 1.0, timings


@pytest.mark.timeout(120)
def test_worlds_of_different_sizes_reuse_the_same_warm_processes() -> None:
    # A fresh pool: on torches where ranks retire every few worlds (distckpt.testing._compat),
    # the shared pool's processes may be at the end of their run.
    with WorldPool(max_ranks=8) as pool:
        big = pool.run_ok(WorldSpec(nodes=2, procs_per_node=4), probes.environment)
        small = pool.run_ok(WorldSpec(nodes=1, procs_per_node=3), probes.environment)
        again = pool.run_ok(WorldSpec(nodes=2, procs_per_node=4), probes.environment)
    big_pids = [e["pid"] for e in big]
    assert [e["pid"] for e in small] == big_pids[:3]
    assert [e["pid"] for e in again] == big_pids


@pytest.mark.timeout(120)
def test_a_rank_exception_is_reported_with_type_message_traceback_and_object(
    world_pool: WorldPool,
) -> None:
    outcomes = world_pool.run(WorldSpec(nodes=1, procs_per_node=3), probes.raise_on, [1])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert [o.value for o in outcomes if o.ok] == [0, 2]
    failed = outcomes[1]
    assert failed.rank == 1
    assert failed.error_type == "builtins.ValueError"
    assert failed.error_message == "boom on rank 1"
    assert failed.traceback is not None and "raise_on" in failed.traceback
    assert isinstance(failed.exception, ValueError)
    assert failed.exit_code is None


@pytest.mark.timeout(120)
def test_run_ok_raises_an_assertion_error_with_every_failed_ranks_traceback(
    world_pool: WorldPool,
) -> None:
    with pytest.raises(AssertionError) as info:
        world_pool.run_ok(WorldSpec(nodes=1, procs_per_node=4), probes.raise_on, [0, 3])
    text = str(info.value)
    assert "2 of 4 ranks failed" in text
    assert "boom on rank 0" in text and "boom on rank 3" in text
    assert "Traceback" in text


@pytest.mark.timeout(120)
def test_a_rank_killed_with_sigkill_is_reported_and_the_pool_recovers(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=2, procs_per_node=2)
    outcomes = world_pool.run(spec, probes.sigkill_on, [2], timeout=30)
    assert [o.ok for o in outcomes] == [True, True, False, True]
    assert outcomes[2].exit_code == -signal.SIGKILL
    assert outcomes[2].error_message is not None and "SIGKILL" in outcomes[2].error_message
    assert world_pool.run_ok(spec, probes.all_reduce_rank) == [6.0] * 4


@pytest.mark.timeout(120)
def test_survivors_of_a_killed_rank_fail_in_their_collective_instead_of_hanging(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=3)
    outcomes = world_pool.run(spec, probes.sigkill_then_collective, [1], timeout=60)
    assert outcomes[1].exit_code == -signal.SIGKILL
    assert not outcomes[0].ok and not outcomes[2].ok
    assert outcomes[0].exit_code is None and outcomes[0].traceback
    assert world_pool.run_ok(spec, probes.all_reduce_rank) == [3.0] * 3


@pytest.mark.timeout(120)
def test_a_rank_that_exits_is_reported_with_its_exit_code(world_pool: WorldPool) -> None:
    outcomes = world_pool.run(WorldSpec(nodes=1, procs_per_node=2), probes.exit_normally, [0])
    assert (outcomes[0].ok, outcomes[0].exit_code) == (False, 3)
    assert outcomes[1].ok


@pytest.mark.timeout(120)
def test_a_hung_world_raises_world_timeout_with_the_stuck_ranks_stacks_and_the_pool_recovers(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=4)
    start = time.monotonic()
    with pytest.raises(WorldTimeout) as info:
        world_pool.run(spec, probes.hang_on, [0, 2], timeout=3.0)
    assert time.monotonic() - start < 15
    err = info.value
    assert sorted(err.stacks) == [0, 2]
    for text in err.stacks.values():
        assert "_sleep_in_named_frame" in text
    assert "_sleep_in_named_frame" in str(err)
    assert [o.value if o else None for o in err.outcomes] == [None, 1, None, 3]
    assert world_pool.run_ok(spec, probes.all_reduce_rank) == [6.0] * 4


@pytest.mark.timeout(120)
def test_the_workdir_is_a_fresh_shared_directory_removed_after_the_world(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=2)
    first = world_pool.run_ok(spec, probes.write_marker, "m")
    assert first[0] == first[1]
    assert not os.path.exists(first[0])
    second = world_pool.run_ok(spec, probes.write_marker, "m")
    assert second[0] != first[0]


@pytest.mark.timeout(120)
def test_a_given_workdir_is_used_and_kept(world_pool: WorldPool, tmp_path: Path) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=2, workdir=tmp_path / "w")
    assert world_pool.run_ok(spec, probes.write_marker, "m") == [str(tmp_path / "w")] * 2
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["m-0", "m-1"]


@pytest.mark.timeout(120)
def test_an_unpicklable_return_value_is_a_rank_failure(world_pool: WorldPool) -> None:
    outcomes = world_pool.run(WorldSpec(nodes=1, procs_per_node=2), probes.return_unpicklable)
    assert not any(o.ok for o in outcomes)
    assert outcomes[0].error_message is not None and "unpicklable" in outcomes[0].error_message


def test_an_unpicklable_function_is_refused_in_the_parent(world_pool: WorldPool) -> None:
    with pytest.raises(TypeError, match="cannot pickle"):
        world_pool.run(WorldSpec(), lambda ctx: None)


def test_a_world_larger_than_the_pool_is_refused(world_pool: WorldPool) -> None:
    with pytest.raises(ValueError, match="max_ranks"):
        world_pool.run(WorldSpec(nodes=11, procs_per_node=3), probes.all_reduce_rank)


def test_a_world_spec_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="nodes"):
        WorldSpec(nodes=0)
    with pytest.raises(ValueError, match="procs_per_node"):
        WorldSpec(procs_per_node=-1)


@pytest.mark.timeout(120)
def test_close_stops_every_rank_process() -> None:
    pool = WorldPool(max_ranks=2)
    pool.run_ok(WorldSpec(nodes=1, procs_per_node=2), probes.all_reduce_rank)
    pids = pool.pids
    assert len(pids) == 2
    pool.close()
    _wait_gone(pids, 10.0)
    with pytest.raises(RuntimeError, match="closed"):
        pool.run(WorldSpec(), probes.all_reduce_rank)


@pytest.mark.timeout(180)
def test_rank_processes_exit_when_the_pool_process_dies() -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys
        from distckpt.testing import probes
        from distckpt.testing.pool import WorldPool, WorldSpec
        pool = WorldPool(max_ranks=2)
        pool.run_ok(WorldSpec(nodes=1, procs_per_node=2), probes.all_reduce_rank)
        print(" ".join(map(str, pool.pids)), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "src")]))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=150
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    _wait_gone(pids, 15.0)


def _wait_gone(pids: list[int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _exists(p)]
        time.sleep(0.1)
    assert not alive, f"processes still alive: {alive}"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
