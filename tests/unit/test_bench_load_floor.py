"""The bench's floor of a Python load reads the real bytes and adds up the steps it names."""

from __future__ import annotations

import os

import pytest

from bench import micro


def test_the_load_floor_reports_every_step_and_sums_the_three_a_safe_load_takes() -> None:
    result = micro.load_floor(scale=0.01, reps=2)
    assert result["tensors"] == 100 and result["bytes"] > 0
    steps = {k: v for k, v in result.items() if isinstance(v, tuple)}
    assert len(steps) == 7
    assert all(lo <= mid <= hi for lo, mid, hi in steps.values())
    hashed = min(steps["read into live + xxh3 per view"][1], steps["read into live, xxh3 in a thread"][1])
    expected = hashed + steps["parse header and skeleton (json)"][1] + steps["check each live tensor"][1]
    assert result["floor"] == expected


def test_the_load_floor_refuses_a_read_that_lands_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_readv = os.readv  # the floor's reads into live tensors (many views) pretend to succeed and read nothing
    monkeypatch.setattr(os, "readv", lambda fd, views: sum(map(len, views)) if len(views) > 1 else real_readv(fd, views))
    with pytest.raises(RuntimeError, match="checksum differs"):
        micro.load_floor(scale=0.01, reps=1)


def test_the_load_floor_refuses_a_short_read(monkeypatch: pytest.MonkeyPatch) -> None:
    real_readv = os.readv  # the floor's reads into live tensors stop one byte short
    monkeypatch.setattr(os, "readv", lambda fd, views: real_readv(fd, views) - (len(views) > 1))
    with pytest.raises(RuntimeError, match="a short read"):
        micro.load_floor(scale=0.01, reps=1)


def test_the_goal_table_shows_the_floor_beside_the_small_load_goals_without_judging_it() -> None:
    from bench import report

    floor = {"tensors": 10000, "raw read of the files, one buffer": [0.010, 0.012, 0.015],
             "distckpt load_checkpoint": [0.055, 0.060, 0.070], "floor": 0.036}
    rows = {g["goal"]: g for g in report.goals15([], None, floor) if "floor" in g["goal"]}
    per_tensor = rows["small w1: floor of a safe Python load, us per tensor"]
    against_raw = rows["small w1: floor of a safe Python load / raw read"]
    assert per_tensor["worst"] == pytest.approx(3.6) and per_tensor["met"] is None
    assert against_raw["worst"] == pytest.approx(3.0) and "1.67x the floor" in against_raw["note"]
    assert not [g for g in report.goals15([], None, None) if "floor" in g["goal"]]
