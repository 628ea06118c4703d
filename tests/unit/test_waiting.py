"""Waiting is visible (issue 14 item 5): a collective that waits long names the absent ranks."""

from __future__ import annotations

import logging
import time

import pytest

from distckpt.waiting import DEFAULT_WARN_AFTER_S, WARN_AFTER_ENV, describe_wait, warn_after, watch


def _wait_for(caplog: pytest.LogCaptureFixture, count: int, level: int, limit: float = 20.0) -> None:
    until = time.monotonic() + limit
    while time.monotonic() < until:
        if sum(r.levelno == level for r in caplog.records) >= count:
            return
        time.sleep(0.01)


def test_a_long_wait_warns_naming_the_absent_ranks_and_repeats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    with watch("write", 0, 4, lambda: [3, 2], timeout=300.0, after=0.02):
        _wait_for(caplog, 2, logging.WARNING)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) >= 2
    assert "ranks 2-3 have not arrived yet" in warnings[0] and "'write' step" in warnings[0]
    assert "timeout of 300 s" in warnings[0]


def test_only_the_lowest_rank_that_arrived_warns_the_others_log_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    with watch("commit", 2, 4, lambda: [0], timeout=60.0, after=0.02):
        _wait_for(caplog, 1, logging.DEBUG)
    assert caplog.records and all(r.levelno == logging.DEBUG for r in caplog.records)
    assert "rank 0 has not arrived yet" in caplog.records[0].getMessage()


def test_a_collective_that_returns_in_time_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    with watch("plan", 0, 4, lambda: [1], timeout=60.0, after=30.0):
        pass
    assert caplog.records == []


def test_a_failing_lookup_never_disturbs_the_collective(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")

    def broken() -> list[int]:
        raise ConnectionError("store gone")

    with watch("read", 0, 2, broken, timeout=60.0, after=0.02):
        _wait_for(caplog, 1, logging.DEBUG)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_when_everyone_arrived_the_warning_says_the_step_itself_is_slow() -> None:
    text = describe_wait("write", 0, 31.0, [], 300.0)
    assert "every rank has arrived" in text and text.startswith("distckpt[rank 0] write:")


@pytest.mark.parametrize(("value", "expected"), [
    (None, DEFAULT_WARN_AFTER_S), ("2.5", 2.5), ("0", 0.0), ("-1", 0.0), ("soon", DEFAULT_WARN_AFTER_S),
])
def test_the_threshold_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str | None,
                                                   expected: float) -> None:
    if value is None:
        monkeypatch.delenv(WARN_AFTER_ENV, raising=False)
    else:
        monkeypatch.setenv(WARN_AFTER_ENV, value)
    assert warn_after() == expected


def test_a_threshold_of_zero_turns_the_warnings_off(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WARN_AFTER_ENV, "0")
    caplog.set_level(logging.DEBUG, logger="distckpt")
    with watch("plan", 0, 4, lambda: [1], timeout=60.0):
        time.sleep(0.05)
    assert caplog.records == []
