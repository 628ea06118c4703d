"""Progress reports and quiet logs (issue 14 items 6 and 7)."""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import pytest

from distckpt.logs import note
from distckpt.progress import Progress, describe_progress, human_bytes

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_give_bytes_done_of_total_rate_and_time_left() -> None:
    assert describe_progress(512 * MiB, 1536 * MiB, 4.0) == (
        "512.0 MiB of 1.5 GiB (33%), 128.0 MiB/s, about 8 s left")
    assert human_bytes(320) == "320 B"


def test_a_long_phase_reports_on_rank_0_after_a_few_seconds_then_periodically(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="distckpt")
    clock = Clock()
    progress = Progress("write", 0, 100 * MiB, clock=clock, after=5.0, every=10.0)
    progress.add(10 * MiB)           # t=0: too early
    clock.now += 6
    progress.add(10 * MiB)           # t=6: first line
    clock.now += 3
    progress.add(10 * MiB)           # t=9: too soon after the first
    clock.now += 8
    progress.add(10 * MiB)           # t=17: second line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "distckpt[rank 0] write: 20.0 MiB of 100.0 MiB (20%), 3.3 MiB/s, about 24 s left",
        "distckpt[rank 0] write: 40.0 MiB of 100.0 MiB (40%), 2.4 MiB/s, about 26 s left",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_a_short_phase_and_other_ranks_report_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    clock = Clock()
    quick = Progress("read", 0, 10, clock=clock)
    quick.add(10)
    other = Progress("read", 3, 10, clock=clock, after=0.0)
    clock.now += 60
    other.add(10)
    assert caplog.records == [] and other.done == 10


def test_track_counts_every_chunk_as_it_is_consumed() -> None:
    progress = Progress("write", 0, 6)
    assert list(progress.track([b"ab", memoryview(b"cdef")])) == [b"ab", memoryview(b"cdef")]
    assert progress.done == 6


def test_progress_true_uses_tqdm_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    bars: list[Any] = []

    class FakeBar:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs, self.n, self.closed = kwargs, 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    progress = Progress("read", 0, 300, bar=True)
    progress.add(100)
    progress.add(200)
    progress.close()
    assert len(bars) == 1 and bars[0].n == 300 and bars[0].closed
    assert bars[0].kwargs["total"] == 300 and bars[0].kwargs["desc"] == "distckpt read"
    Progress("read", 1, 300, bar=True).add(5)  # not rank 0: no bar
    assert len(bars) == 1


def test_progress_true_without_tqdm_logs_every_second_from_the_start(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    caplog.set_level(logging.INFO, logger="distckpt")
    clock = Clock()
    progress = Progress("write", 0, 4, bar=True, clock=clock)
    progress.add(1)
    clock.now += 1.5
    progress.add(1)
    assert len(caplog.records) == 2 and "2 B of 4 B (50%)" in caplog.records[1].getMessage()


def test_a_broken_bar_never_fails_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def update(self, n: int) -> None:
            raise OSError("terminal closed")

        def close(self) -> None:
            raise OSError("terminal closed")

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=Broken))
    progress = Progress("read", 0, 10, bar=True)
    progress.add(10)
    progress.close()
    assert progress.done == 10


def test_notes_are_info_on_rank_0_and_debug_elsewhere_with_rank_and_phase(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    note(0, "commit", "saved %s", "x")
    note(2, "commit", "saved %s", "x")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "distckpt[rank 0] commit: saved x"),
        (logging.DEBUG, "distckpt[rank 2] commit: saved x"),
    ]
