"""Faults only real processes can show: SIGKILL in each save phase, a rank that never
calls save, a real file-size limit and an injected ENOSPC, ranks that disagree.

Every world is a warm gloo world from the harness (``world_pool``, shared with the
rest of the session); the coordinator timeout is ``ranks.TIMEOUT`` seconds.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from distckpt.testing.pool import WorldPool, WorldSpec
from tests.faults import ranks, scenario
from tests.faults.ranks import TIMEOUT, Fault

pytestmark = [pytest.mark.multirank]

SPEC = WorldSpec(nodes=2, procs_per_node=2)
#: What "within the timeout" allows for scheduling on a loaded two-core machine.
SLACK_S = 1.5
#: Survivors of a dead or absent peer must raise within this many seconds.
WITHIN_S = TIMEOUT + SLACK_S
#: How long an absent rank stays away (longer than its peers may wait).
ABSENT_S = TIMEOUT + 3


def _run(pool: WorldPool, fn: Any, *args: Any, spec: WorldSpec = SPEC) -> list[Any]:
    """``fn(ctx, *args)`` on every rank (positional only: the pool's ``timeout`` is its own)."""
    return pool.run(spec, fn, *args, timeout=60)


def _values(outcomes: list[Any]) -> list[dict[str, Any]]:
    bad = [o.describe() for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)
    return [o.value for o in outcomes]


def _save_good(pool: WorldPool, ex: Any, out: str, generation: int = 0) -> str:
    values = _values(_run(pool, ranks.save, ex, out, generation, Fault(), None, ranks.CALM_TIMEOUT))
    paths = {v.get("path") for v in values}
    assert len(paths) == 1 and None not in paths, values
    return paths.pop()


# ------------------------------------------------------------------ SIGKILL

@pytest.mark.timeout(120)
@pytest.mark.parametrize(("phase", "victim"), [("plan", 3), ("validate", 0), ("write", 2), ("write", 0), ("commit", 0)])
def test_a_rank_killed_in_a_save_phase_fails_the_survivors_naming_it_keeps_the_previous_checkpoint_latest_and_the_next_save_cleans_up(
    world_pool: WorldPool, tmp_path: Path, phase: str, victim: int,
) -> None:
    ex = scenario.example()
    out = str(tmp_path)
    previous = _save_good(world_pool, ex, out, generation=0)

    outcomes = _run(world_pool, ranks.save, ex, out, 1, Fault("kill", victim, phase))
    assert outcomes[victim].exit_code == -9, outcomes[victim].describe()
    survivors = _values([o for o in outcomes if o.rank != victim])
    for v in survivors:
        assert v.get("error") == "CollectiveTimeoutError", v
        assert set(v["failures"]) == {victim}, v["failures"]  # exactly the dead rank, on every survivor
        assert f"did not reach the '{phase}' step" in v["failures"][victim]
        assert v["elapsed"] <= WITHIN_S, v
    assert len({str(v["failures"]) for v in survivors}) == 1

    # Nothing new is visible; a dead rank 0 may leave its staging directory behind.
    assert scenario.committed(out) == [os.path.basename(previous)]
    leftovers = scenario.hidden_entries(out)
    if victim == 0 and phase != "plan":
        assert leftovers and all(".staging-" in n for n in leftovers)
    else:
        assert leftovers == []

    # A fresh world: the previous checkpoint is still the latest and loads bit-exact;
    # the next save commits and removes the leftovers.
    after = _values(_run(world_pool, ranks.recover, ex, out, 0, 2))
    assert all(v.get("loaded") == previous for v in after), after
    newest = {v["path"] for v in after}
    assert len(newest) == 1
    assert scenario.committed(out) == sorted([os.path.basename(previous), os.path.basename(newest.pop())])
    assert scenario.hidden_entries(out) == []


@pytest.mark.timeout(120)
def test_a_rank_that_never_calls_save_makes_the_others_raise_naming_it(world_pool: WorldPool, tmp_path: Path) -> None:
    ex = scenario.example()
    out = str(tmp_path)
    previous = _save_good(world_pool, ex, out)
    absent = 1
    values = _values(_run(world_pool, ranks.save, ex, out, 1, Fault("absent", absent, limit=ABSENT_S)))
    assert values[absent] == {"rank": absent, "absent": True}
    for v in values[:absent] + values[absent + 1:]:
        assert v.get("error") == "CollectiveTimeoutError", v
        assert set(v["failures"]) == {absent} and "did not reach the 'plan' step" in v["failures"][absent]
        assert v["elapsed"] <= WITHIN_S, v
    assert scenario.committed(out) == [os.path.basename(previous)] and scenario.hidden_entries(out) == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", [Fault("absent", 1, limit=7.0), Fault("kill", 2, "write")],
                         ids=["never-calls-save", "killed-in-write"])
def test_survivors_raise_within_the_coordinators_timeout_not_twice_it(
    world_pool: WorldPool, tmp_path: Path, fault: Fault,
) -> None:
    timeout = 2.0
    ex = scenario.example()
    outcomes = _run(world_pool, ranks.save, ex, str(tmp_path), 0, fault, None, timeout)
    survivors = [o.value for o in outcomes if o.rank != fault.rank]
    assert all(v.get("error") == "CollectiveTimeoutError" for v in survivors), survivors
    assert max(v["elapsed"] for v in survivors) <= timeout + SLACK_S, [round(v["elapsed"], 2) for v in survivors]


# ---------------------------------------------------------------- disk full

@pytest.mark.timeout(120)
@pytest.mark.parametrize(("victim", "direct_io"), [(0, False), (3, False), (3, True)],
                         ids=["rank-0", "rank-3", "rank-3-direct-io"])
def test_a_real_file_size_limit_on_one_writer_fails_every_rank_naming_it_and_efbig_and_keeps_the_previous_checkpoint(
    world_pool: WorldPool, tmp_path: Path, victim: int, direct_io: bool,
) -> None:
    # The limit applies to every file the rank process writes, the harness's FileStore (the
    # torch.distributed rendezvous) included: 256 KiB leaves that store alone, while each rank's
    # 1 MiB PER_RANK file runs into it. (A limit of a few KiB truncates the store's records and
    # hangs destroy_process_group in the harness: a property of the test world, not of distckpt.)
    ex = scenario.example(big=True)
    out = str(tmp_path)
    previous = _save_good(world_pool, ex, out)
    values = _values(_run(world_pool, ranks.save, ex, out, 1, Fault("rlimit", victim, limit=256 * 1024), None,
                          ranks.TIMEOUT, direct_io))
    for v in values:
        assert v.get("error") == "CrossRankError", v
        assert set(v["failures"]) == {victim} and v["phase"] == "write"
        assert f"[Errno {errno.EFBIG}]" in v["failures"][victim] and "File too large" in v["failures"][victim]
    assert len({v["message"] for v in values}) == 1
    assert scenario.committed(out) == [os.path.basename(previous)] and scenario.hidden_entries(out) == []
    loaded = _values(_run(world_pool, ranks.load, ex, out, 0))
    assert all(v["path"] == previous for v in loaded), loaded


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("victim", "phase"), [(3, "write"), (1, "write"), (0, "commit")],
                         ids=["writer-rank-3", "non-writer-rank-1", "rank-0-writing-the-manifest"])
def test_an_injected_enospc_fails_every_rank_naming_it_and_the_errno_and_keeps_the_previous_checkpoint(
    world_pool: WorldPool, tmp_path: Path, victim: int, phase: str,
) -> None:
    ex = scenario.example()
    out = str(tmp_path)
    previous = _save_good(world_pool, ex, out)
    values = _values(_run(world_pool, ranks.save, ex, out, 1, Fault("enospc", victim, phase)))
    writes_nothing = victim == 1  # rank 1 writes only its PER_RANK file; it still hits ENOSPC there
    for v in values:
        assert v.get("error") == "CrossRankError", v
        assert set(v["failures"]) == {victim}, v["failures"]
        assert f"[Errno {errno.ENOSPC}]" in v["failures"][victim] and "No space left on device" in v["failures"][victim]
        assert v["phase"] == phase or (writes_nothing and v["phase"] == "write")
    assert scenario.committed(out) == [os.path.basename(previous)] and scenario.hidden_entries(out) == []
    loaded = _values(_run(world_pool, ranks.load, ex, out, 0))
    assert all(v["path"] == previous for v in loaded), loaded


# ------------------------------------------------------- disagreeing ranks

@pytest.mark.timeout(60)
@pytest.mark.parametrize(("what", "odd_rank", "says"), [
    ("an extra component", 2, "declares 'extra' which rank 0 does not"),
    ("a missing component", 3, "does not declare 'trainer'"),
    ("another pattern", 1, "'rng' as ('replicated'"),
    ("another group", 3, "'model' as ('per_group(tp)'"),
    ("another validation level", 1, "'scheduler'"),
])
def test_ranks_that_declare_different_components_patterns_or_groups_all_raise_component_mismatch_with_a_per_rank_difference(
    world_pool: WorldPool, tmp_path: Path, what: str, odd_rank: int, says: str,
) -> None:
    values = _values(_run(world_pool, ranks.declare_differently, scenario.example(), str(tmp_path), what, odd_rank))
    for v in values:
        assert v.get("error") == "ComponentMismatchError", v
        assert set(v["failures"]) == {odd_rank} and says in v["failures"][odd_rank], v["failures"]
    assert len({v["message"] for v in values}) == 1
    assert scenario.committed(str(tmp_path)) == [] and scenario.hidden_entries(str(tmp_path)) == []
