"""Each torch-version shim of distckpt.testing._compat does its job on the torch running the suite."""

from __future__ import annotations

import pytest

from distckpt.testing import _compat, probes
from distckpt.testing.pool import WorldPool, WorldSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.6.0+cu124", (2, 6)), ("2.13.0+cpu", (2, 13)), ("2.14.0a0+git1234", (2, 14)), ("3.0", (3, 0))],
)
def test_a_torch_version_string_reads_as_major_and_minor(text: str, expected: tuple[int, int]) -> None:
    assert _compat.parse_version(text) == expected


def test_a_string_that_is_not_a_version_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="nightly"):
        _compat.parse_version("nightly")


def test_teardown_outside_any_world_does_nothing() -> None:
    _compat.destroy_process_groups()
    assert _compat.worlds_kept() == 0


@pytest.mark.multirank
@pytest.mark.timeout(240)
def test_worlds_with_subgroups_tear_down_and_ranks_retire_only_where_teardown_can_deadlock() -> None:
    """GLOO_TEARDOWN_DEADLOCKS (torch < 2.13): every world still finishes, with subgroups.

    Where the shim applies, a rank process keeps its groups and retires after
    WORLDS_PER_PROCESS worlds (new pids after that many); elsewhere it destroys
    them and the same processes serve every world.
    """
    spec = WorldSpec(nodes=2, procs_per_node=2)
    worlds = _compat.WORLDS_PER_PROCESS + 2
    with WorldPool(max_ranks=4) as pool:
        pids = []
        for _ in range(worlds):
            assert pool.run_ok(spec, probes.subgroup_all_reduce, timeout=60) == [
                [6.0, 1.0], [6.0, 1.0], [6.0, 5.0], [6.0, 5.0]
            ]
            pids.append(tuple(e["pid"] for e in pool.run_ok(spec, probes.environment, timeout=60)))
    # Two worlds per iteration: the subgroup world and the environment probe.
    changed = [i for i in range(1, worlds) if pids[i] != pids[i - 1]]
    if _compat.GLOO_TEARDOWN_DEADLOCKS:
        per = _compat.WORLDS_PER_PROCESS // 2
        assert changed == list(range(per, worlds, per)), pids
    else:
        assert changed == [], pids
