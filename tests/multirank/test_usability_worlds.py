"""Issue 14 on real gloo worlds: a late rank is named while the others wait."""

from __future__ import annotations

from pathlib import Path

import pytest

from distckpt.testing.pool import WorldPool, WorldSpec
from tests.multirank import usability_ranks

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(180)]


def test_a_rank_arriving_late_is_named_in_a_warning_while_the_others_wait(pool: WorldPool, tmp_path: Path) -> None:
    results = pool.run_ok(WorldSpec(nodes=1, procs_per_node=3, workdir=tmp_path), usability_ranks.late_rank,
                          2, 3.0, timeout=120)
    warnings = [text for level, text in results[0] if level == "WARNING"]
    named = [w for w in warnings if "rank 2 has not arrived yet" in w and "'plan' step" in w]
    assert named and named[0].startswith("distckpt[rank 0] plan: waited "), results[0]
    # rank 1 waits too, but leaves the warning to the lowest rank that arrived (rank 0)
    assert any("rank 2 has not arrived yet" in t for lv, t in results[1] if lv == "DEBUG"), results[1]
    assert not any("rank 2 has not arrived yet" in t for lv, t in results[1] if lv == "WARNING")
    # and the save itself went through: INFO from rank 0 only
    assert [t for lv, t in results[0] if lv == "INFO" and "commit: saved" in t]
    assert not [t for r in results[1:] for lv, t in r if lv == "INFO"]
