"""The collective error protocol under faults (issue 11, items 5, 6, 7, 9, 11, 13).

Ranks that disagree on a call's arguments, one rank that alone finds a
checkpoint incompatible, a rank that dies as read_and_broadcast starts
broadcasting, a load_state_dict that fails after tensors were read in place, a
straggler that arrives after its peers gave up, and a KeyboardInterrupt inside a
phase: every rank raises the same error naming the same rank(s), without
waiting out the timeout where nobody died, and the job recovers.

Real gloo worlds from the warm pool (``world_pool``); coordinator timeout
``ranks.TIMEOUT`` seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from distckpt.errors import rank_span
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.faults import protocol_ranks, scenario
from tests.faults.ranks import TIMEOUT

pytestmark = [pytest.mark.multirank]

SPEC = WorldSpec(nodes=2, procs_per_node=2)
#: What "within the timeout" allows for scheduling on a loaded two-core machine.
SLACK_S = 1.5


def _values(outcomes: list[Any]) -> list[dict[str, Any]]:
    bad = [o.describe() for o in outcomes if not o.ok]
    assert not bad, "\n".join(bad)
    return [o.value for o in outcomes]


def _run(pool: WorldPool, fn: Any, *args: Any) -> list[Any]:
    return pool.run(SPEC, fn, *args, timeout=90)


# ------------------------------------------------------------- item 5

@pytest.mark.timeout(90)
@pytest.mark.parametrize(("op", "argument", "odd_rank"), [
    ("save", "checkpoint_path", 2),
    ("save", "checkpoint_id", 3),
    ("save", "validate", 1),
    ("save", "async_save", 0),
    ("save", "overwrite", 3),
    ("load", "checkpoint_path", 1),
    ("load", "strict", 0),
])
def test_ranks_passing_different_arguments_all_raise_argument_mismatch_naming_the_argument_and_the_odd_rank_and_nothing_is_written(
    world_pool: WorldPool, tmp_path: Path, op: str, argument: str, odd_rank: int,
) -> None:
    out = str(tmp_path)
    values = _values(_run(world_pool, protocol_ranks.disagree, scenario.example(), out, op, argument, odd_rank))
    for v in values:
        assert v.get("error") == "ArgumentMismatchError", v
        assert set(v["failures"]) == {odd_rank}, v["failures"]
        assert f"passed {argument}=" in v["failures"][odd_rank] and argument in v["message"]
        assert v["phase"] == ("plan" if op == "save" else "resolve")
        assert v["elapsed"] < TIMEOUT, v  # from the first collective, not a timeout
    assert len({v["message"] for v in values}) == 1
    assert scenario.committed(out) == ([] if op == "save" else ["checkpoint-base"])
    assert scenario.hidden_entries(out) == []
    assert not os.path.exists(os.path.join(out, "here")) and not os.path.exists(os.path.join(out, "elsewhere"))


# ------------------------------------------------------------- item 6

@pytest.mark.timeout(90)
def test_one_ranks_compatibility_failure_fails_every_rank_at_once_before_any_data_is_read(
    world_pool: WorldPool, tmp_path: Path,
) -> None:
    odd = 2
    values = _values(_run(world_pool, protocol_ranks.incompatible_on_one_rank, scenario.example(), str(tmp_path), odd))
    for v in values:
        assert v.get("error") == "ComponentMismatchError", v
        assert set(v["failures"]) == {odd} and "injected on one rank" in v["failures"][odd], v
        assert v["phase"] == "resolve" and "read" not in v["phases"], v
        assert v["elapsed"] < TIMEOUT, v
    assert len({v["message"] for v in values}) == 1


# ------------------------------------------------------------- item 7

@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", [0, 3])
def test_a_rank_dying_as_read_and_broadcast_starts_broadcasting_is_named_by_every_survivor(
    world_pool: WorldPool, tmp_path: Path, victim: int,
) -> None:
    outcomes = _run(world_pool, protocol_ranks.die_before_broadcast, scenario.example(), str(tmp_path), victim)
    assert outcomes[victim].exit_code == -9, outcomes[victim].describe()
    survivors = _values([o for o in outcomes if o.rank != victim])
    for v in survivors:
        assert v.get("error") == "CollectiveTimeoutError", v
        assert set(v["failures"]) == {victim} and "did not reach the 'read' step" in v["failures"][victim], v
        assert v["phase"] == "read"
        assert v["elapsed"] <= TIMEOUT + SLACK_S, v
    assert len({str(v["failures"]) for v in survivors}) == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", [0, 3])
def test_a_rank_dying_inside_read_and_broadcasts_broadcast_step_is_named_by_every_survivor(
    world_pool: WorldPool, tmp_path: Path, victim: int,
) -> None:
    outcomes = _run(world_pool, protocol_ranks.die_during_broadcast, scenario.example(), str(tmp_path), victim)
    assert outcomes[victim].exit_code == -9, outcomes[victim].describe()
    survivors = _values([o for o in outcomes if o.rank != victim])
    for v in survivors:
        assert v.get("error") == "CollectiveTimeoutError", v
        assert v["failures"] == {victim: "died or hung during the 'read' step"}, v
        assert v["phase"] == "read" and v["elapsed"] <= TIMEOUT + SLACK_S, v
    assert len({v["message"] for v in survivors}) == 1


# ------------------------------------------------------------- item 9

@pytest.mark.timeout(90)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "fresh-buffers"])
def test_a_failed_load_names_on_every_rank_the_ranks_and_components_whose_live_state_changed(
    world_pool: WorldPool, tmp_path: Path, in_place: bool,
) -> None:
    ex = scenario.example()
    odd, odd_key = 1, "optimizer"
    keys = sorted(d.key for d in ex.decls)
    values = _values(_run(world_pool, protocol_ranks.fail_one_load, ex, str(tmp_path), odd, odd_key, in_place))
    # Components load in key order; the odd rank changed those before the refusing one, and may have
    # changed that one too (read into in place, or half-applied by its load_state_dict). Every other
    # rank loaded everything.
    odd_changed = keys[:keys.index(odd_key) + 1]
    for v in values:
        assert v.get("error") == "CrossRankError", v
        assert set(v["failures"]) == {odd} and "load_state_dict refused" in v["failures"][odd]
        assert f"rank {odd} changed the live state of {odd_changed}" in v["message"], v["message"]
        others = rank_span(set(range(SPEC.world_size)) - {odd})  # identical notes are grouped: "ranks 0, 2-3"
        assert f"\n  {others} changed the live state of {keys}" in v["message"], v["message"]
    assert len({v["message"] for v in values}) == 1


# ------------------------------------------------------------- item 11

@pytest.mark.timeout(120)
@pytest.mark.parametrize("late", [3, 0])
def test_a_straggler_is_named_by_every_rank_itself_included_and_the_next_save_and_load_work(
    world_pool: WorldPool, tmp_path: Path, late: int,
) -> None:
    out = str(tmp_path)
    values = _values(_run(world_pool, protocol_ranks.straggle, scenario.example(), out, late, TIMEOUT + 1.5))
    for v in values:
        first = v["first"]
        assert first.get("error") == "CollectiveTimeoutError", v
        assert set(first["failures"]) == {late} and "did not reach the 'plan' step" in first["failures"][late], v
    assert len({str(v["first"]["failures"]) for v in values}) == 1
    for v in values:
        assert v["second"].get("path", "").endswith("checkpoint-second"), v
        assert v["load"].get("path") == v["second"]["path"], v
    assert scenario.committed(out) == ["checkpoint-second"] and scenario.hidden_entries(out) == []


# ------------------------------------------------------------- item 13

@pytest.mark.timeout(90)
@pytest.mark.parametrize(("victim", "phase"), [(1, "write"), (0, "plan"), (2, "commit"), (0, "publish")])
def test_a_keyboard_interrupt_on_one_rank_is_reported_to_its_peers_before_it_propagates(
    world_pool: WorldPool, tmp_path: Path, victim: int, phase: str,
) -> None:
    out = str(tmp_path)
    values = _values(_run(world_pool, protocol_ranks.interrupt, scenario.example(), out, victim, phase))
    assert values[victim].get("interrupted") is True, values[victim]
    peers = [v for v in values if v["rank"] != victim]
    for v in peers:
        assert v.get("error") == "CrossRankError", v
        assert set(v["failures"]) == {victim} and "KeyboardInterrupt" in v["failures"][victim], v
        assert v["phase"] == ("commit" if phase == "publish" else phase) and v["elapsed"] < TIMEOUT, v
    assert len({v["message"] for v in peers}) == 1
    assert scenario.committed(out) == [] and scenario.hidden_entries(out) == []
