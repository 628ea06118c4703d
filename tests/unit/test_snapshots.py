"""The snapshot budget of asynchronous saves: bounded copies, handed over in order, never stuck."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from distckpt.snapshots import SnapshotBudget, streamed


def _job(nbytes: int, tag: int) -> tuple[Any, ...]:
    from distckpt.codec import encode

    return ("k", f"k/{tag}", encode({"t": torch.full((nbytes // 4,), float(tag))}, copy=True), "", ())


def _jobs(sizes: list[int], log: list[tuple[str, int]], budget: SnapshotBudget) -> Callable[..., Iterator[Any]]:
    def jobs(reserve: Callable[[int], None]) -> Iterator[Any]:
        for tag, n in enumerate(sizes):
            reserve(n)
            log.append(("copied", budget.held))
            yield _job(n, tag)
    return jobs


def test_copies_never_hold_more_than_the_budget_and_arrive_in_order() -> None:
    budget = SnapshotBudget(1000)
    log: list[tuple[str, int]] = []
    produce, pump = streamed(_jobs([400, 400, 400, 400], log, budget), budget)
    seen: list[float] = []

    def consume() -> None:
        for job in produce():
            seen.append(float(job[2].tensors[0][0]))

    writer = threading.Thread(target=consume, daemon=True)
    writer.start()
    pump()
    writer.join(10)
    assert seen == [0.0, 1.0, 2.0, 3.0]
    assert budget.peak <= 1000 and all(held <= 1000 for _, held in log)


def test_a_file_larger_than_the_budget_is_copied_alone() -> None:
    budget = SnapshotBudget(100)
    log: list[tuple[str, int]] = []
    produce, pump = streamed(_jobs([400, 40, 400], log, budget), budget)
    writer = threading.Thread(target=lambda: list(produce()), daemon=True)
    writer.start()
    pump()
    writer.join(10)
    assert [held for _, held in log] == [400, 40, 400]  # each alone: the previous one was written first


def test_written_copies_are_freed_at_once() -> None:
    budget = SnapshotBudget(10_000)
    produce, pump = streamed(lambda reserve: iter([reserve(400) or _job(400, 0)]), budget)
    pump()
    it = produce()
    job = next(it)
    assert job[2].tensors[0].untyped_storage().nbytes() == 400
    assert next(it, None) is None
    assert job[2].tensors[0].untyped_storage().nbytes() == 0 and budget.held == 0  # let go of its copy


def test_a_snapshot_error_is_raised_by_the_writer() -> None:
    budget = SnapshotBudget(1000)

    def jobs(reserve: Callable[[int], None]) -> Iterator[Any]:
        reserve(10)
        raise RuntimeError("cannot copy")
        yield  # pragma: no cover

    produce, pump = streamed(jobs, budget)
    pump()
    with pytest.raises(RuntimeError, match="cannot copy"):
        list(produce())


def test_a_writer_that_gives_up_releases_a_waiting_snapshot() -> None:
    budget = SnapshotBudget(500)
    log: list[tuple[str, int]] = []
    produce, pump = streamed(_jobs([400, 400, 400], log, budget), budget)

    def failing_writer() -> None:
        it = produce()
        next(it)
        it.close()  # the write phase failed after its first file

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    failing_writer()
    pumping.join(10)
    assert not pumping.is_alive() and budget.aborted


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="limit"):
        SnapshotBudget(0)
