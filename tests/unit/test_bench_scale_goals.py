"""The bench's goal table of issue 15 judges the scale goals from the paper bench's figures."""

from __future__ import annotations

from typing import Any

from bench import report

MIB = 1024 * 1024


def _plan(world: int, files: int, to_json: float, from_json: float, **extra: Any) -> dict[str, Any]:
    return {"world": world, "files": files, "to_json_s": to_json, "from_json_s": from_json, **extra}


def _rows(paper: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {g["goal"].split(" (")[0]: g for g in report.goals15([], paper) if g["goal"].startswith("scale:")}


def test_scale_goals_are_listed_as_not_measured_without_a_paper_run() -> None:
    rows = _rows(None)
    assert len(rows) == 3
    assert all(g["met"] is None and g["note"] == "not measured" for g in rows.values())


def test_wire_bytes_are_judged_when_the_paper_bench_reports_them() -> None:
    paper = {"plans": [_plan(16384, 100, 1.0, 1.0, plan_phase_wire_per_rank=3 * MIB,
                             plan_phase_received_per_rank=1 * MIB)]}
    row = _rows(paper)["scale: plan-phase bytes received per rank at 16,384 ranks"]
    assert row["worst"] == 3.0 and row["met"] is False
    assert "wire" in row["note"]


def test_payload_bytes_stand_in_for_wire_bytes_and_say_so() -> None:
    paper = {"plans": [_plan(16384, 100, 1.0, 1.0, plan_phase_received_per_rank=1 * MIB)]}
    row = _rows(paper)["scale: plan-phase bytes received per rank at 16,384 ranks"]
    assert row["worst"] == 1.0 and row["met"] is True
    assert "payload" in row["note"]


def test_the_65536_rank_time_uses_the_median_of_the_repetitions() -> None:
    stats = {"topology_plan_manifest_s": {"min": 0.5, "median": 1.5, "max": 2.0}}
    paper = {"plans": [_plan(65536, 400, 0.1, 0.1, stats=stats, topology_plan_manifest_s=0.5)]}
    row = _rows(paper)["scale: topology + plan + manifest at 65,536 ranks"]
    assert row["worst"] == 1.5 and row["met"] is False
    assert row["stats"] == (0.5, 1.5, 2.0)


def test_manifest_time_per_file_that_grows_with_the_world_is_not_linear() -> None:
    linear = {"plans": [_plan(16384, 100, 1.0, 1.0), _plan(65536, 400, 4.0, 4.0)]}
    quadratic = {"plans": [_plan(16384, 100, 1.0, 1.0), _plan(65536, 400, 16.0, 16.0)]}
    name = "scale: manifest write+parse per file, 65,536 vs 16,384 ranks"
    assert _rows(linear)[name]["met"] is True
    assert _rows(quadratic)[name]["met"] is False and _rows(quadratic)[name]["worst"] == 4.0
