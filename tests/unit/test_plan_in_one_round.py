"""A save in the world of the coordinator's last save plans its files in the plan phase's first round.

Every rank sends, with its report, the vote it made on the topology it kept
(:class:`distckpt.planreports.AgreedWorld`) and the key of the reports it kept; the guess holds only when
every rank sent the key of the reports gathered in that very round. Otherwise the phase takes its
second round as before, and a failure still fails every rank with nothing left behind.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from distckpt import (
    ArgumentMismatchError,
    CheckpointCoordinator,
    CheckpointManifest,
    Pattern,
    StateComponent,
    register_pattern,
)
from distckpt.planning import local_report
from distckpt.planreports import AgreedWorld, reports_key
from distckpt.testing import ThreadComm
from distckpt.topology import Topology
from tests.helpers import Box, CountingBox, all_ok, threads


def model_state() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.arange(250, dtype=torch.float32) + i for i in range(8)}  # 8,000 bytes


class PlanRounds:
    """Counts, per rank, the all-gathers of the plan phase (ThreadComm.all_gather, patched)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rounds: dict[int, int] = {}
        self._lock = threading.Lock()
        real = ThreadComm.all_gather

        def counting(comm: ThreadComm, obj: Any, phase: str) -> list[Any]:
            if phase == "plan":
                with self._lock:
                    self.rounds[comm.rank] = self.rounds.get(comm.rank, 0) + 1
            return real(comm, obj, phase)

        monkeypatch.setattr(ThreadComm, "all_gather", counting)

    def take(self) -> dict[int, int]:
        with self._lock:
            out, self.rounds = self.rounds, {}
        return out


def coordinator(comm: ThreadComm, tmp_path: Path, **options: Any) -> CheckpointCoordinator:
    return CheckpointCoordinator([StateComponent("model", Box(model_state()), "replicated")], dist=comm,
                                 output_dir=tmp_path, **options)


def second_save(coord: CheckpointCoordinator, **call: Any) -> BaseException | None:
    """Save once, then again with ``call``: the second save's error, or ``None``."""
    coord.save_checkpoint(checkpoint_id="one")
    try:
        coord.save_checkpoint(**call)
    except Exception as exc:
        return exc
    return None


def files_of(path: str) -> list[tuple[str, int, int, int]]:
    return [(f.path, f.writer, f.part, f.parts) for f in CheckpointManifest.load(path).components["model"].files]


@pytest.mark.parametrize("min_part_bytes", [None, 3_000])
def test_a_second_save_in_the_same_world_plans_in_one_round_and_writes_the_same_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_part_bytes: int | None) -> None:
    counter = PlanRounds(monkeypatch)
    seen: list[dict[int, int]] = []
    gate = threading.Barrier(4)

    def save(comm: ThreadComm) -> tuple[str, str, str]:
        coord = coordinator(comm, tmp_path, min_part_bytes=min_part_bytes)
        first = coord.save_checkpoint()
        if gate.wait() == 0:
            seen.append(counter.take())
        gate.wait()
        second = coord.save_checkpoint()
        if gate.wait() == 0:
            seen.append(counter.take())
        gate.wait()
        third = coord.save_checkpoint(async_save=True, background_staging=True).result()
        return first, second, third

    first, second, third = all_ok(threads(4, save))[0]
    assert seen == [dict.fromkeys(range(4), 2), dict.fromkeys(range(4), 1)]
    assert counter.take() == dict.fromkeys(range(4), 1)  # the asynchronous save too
    assert files_of(first) == files_of(second) == files_of(third)
    if min_part_bytes:  # the guess carried the lowest rank's part counts: the state is still split
        assert {parts for *_, parts in files_of(second)} == {2}

    def load(comm: ThreadComm) -> dict[str, torch.Tensor]:
        box = Box({k: torch.zeros_like(v) for k, v in model_state().items()})
        CheckpointCoordinator([StateComponent("model", box, "replicated")], dist=comm,
                              output_dir=tmp_path).load_checkpoint(third)
        return box.state

    for state in all_ok(threads(4, load)):
        assert all(torch.equal(state[k], v) for k, v in model_state().items())


@pytest.mark.parametrize("kept", ["a stranger's reports", "its own report among others changed"])
def test_a_rank_that_kept_another_world_makes_every_rank_take_the_second_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kept: str) -> None:
    counter = PlanRounds(monkeypatch)

    def save(comm: ThreadComm) -> tuple[str, str]:
        coord = coordinator(comm, tmp_path, min_part_bytes=3_000)
        first = coord.save_checkpoint()
        if comm.rank == 2:  # this rank's last world is not the one the others kept
            world = coord._agreed
            assert world is not None
            if kept == "a stranger's reports":  # it does not guess at all
                coord._agreed = AgreedWorld((b"x" * 40,) * 3, (), Topology(world_size=3))
            else:  # it guesses, on its own unchanged report, with the key of a world nobody has
                reports = (world.reports[0] + b"\0", *world.reports[1:])
                coord._agreed = AgreedWorld(reports, world.names, world.topology)
        return first, coord.save_checkpoint()

    first, second = all_ok(threads(3, save))[0]
    assert counter.take() == dict.fromkeys(range(3), 4)  # two rounds in each save
    assert files_of(first) == files_of(second)


def test_a_later_save_into_a_folder_that_does_not_exist_yet_plans_in_two_rounds_and_commits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = PlanRounds(monkeypatch)
    target = tmp_path / "new" / "deep" / "ckpt"

    def save(comm: ThreadComm) -> tuple[str, str]:
        coord = coordinator(comm, tmp_path)
        first = coord.save_checkpoint()
        return first, coord.save_checkpoint(checkpoint_path=target)  # rank 0 cannot allocate in its guess

    first, second = all_ok(threads(3, save))[0]
    assert second == str(target) and files_of(first) == files_of(second)
    assert counter.take() == dict.fromkeys(range(3), 4)


def test_arguments_that_differ_in_a_guessed_round_fail_every_rank_and_leave_no_staging(
        tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> Any:  # rank 0 allocates in the second save's first round, before the
        return second_save(coordinator(comm, tmp_path), checkpoint_id="two", overwrite=comm.rank == 1)  # comparison

    results = threads(3, save)
    assert all(isinstance(r, ArgumentMismatchError) and "overwrite" in str(r) for r in results), results
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-one"]


@register_pattern
@dataclass(frozen=True, eq=False)
class FailsOnSecondPlan(Pattern):
    """Everyone in one set, until rank 1's thread plans a second time: then it raises."""

    kind = "test_fails_on_second_plan"
    calls: ClassVar[list[int]] = []  # not a parameter: declarations stay alike on every rank

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        if threading.current_thread().name == "rank-1":
            self.calls.append(1)
            if len(self.calls) > 1:
                raise RuntimeError("flaky pattern")
        return [range(topology.world_size)]


def test_a_pattern_raising_in_the_guess_fails_the_first_round_on_every_rank_once(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> Any:
        threading.current_thread().name = f"rank-{comm.rank}"
        coord = CheckpointCoordinator([StateComponent("model", Box(model_state()), FailsOnSecondPlan())],
                                      dist=comm, output_dir=tmp_path)
        coord.save_checkpoint(checkpoint_id="one")  # plans once on rank 1, in the second round
        return coord.save_checkpoint(checkpoint_id="two")  # the guess raises, and nothing plans again

    FailsOnSecondPlan.calls.clear()
    results = threads(2, save)
    assert all(isinstance(r, Exception) and "flaky pattern" in str(r) and r.phase == "plan"  # type: ignore[attr-defined]
               for r in results), results
    assert len(FailsOnSecondPlan.calls) == 2  # not retried by a second round
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-one"]


class FailsOnSecondAsk(CountingBox):
    """A Stateful whose ``state_dict()`` raises the second time it is asked."""

    def state_dict(self) -> Any:
        state = super().state_dict()
        if self.calls == 2:
            raise RuntimeError("state_dict failed once")
        return state


def test_a_state_dict_failing_in_the_guess_fails_the_save_once_on_every_rank_without_asking_again(
        tmp_path: Path) -> None:
    boxes: dict[int, FailsOnSecondAsk] = {}

    def save(comm: ThreadComm) -> Any:
        box = boxes[comm.rank] = FailsOnSecondAsk(model_state())
        coord = CheckpointCoordinator([StateComponent("model", box, "replicated")], dist=comm, output_dir=tmp_path,
                                      min_part_bytes=3_000)  # rank 0 sizes the state: in the guess, next time
        return second_save(coord, checkpoint_id="two")

    results = threads(3, save)
    assert all(isinstance(r, Exception) and "state_dict failed once" in str(r)
               and r.phase == "plan" for r in results), results  # type: ignore[attr-defined]
    assert boxes[0].calls == 2  # once per save: the failure is not retried (and hidden) by a second round
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-one"]


def test_an_allocation_failing_in_the_guess_is_asked_once_and_fails_every_rank(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distckpt import CheckpointBusyError, series

    real = series.allocate
    asked: list[bool] = []

    def allocate(*args: Any) -> Any:
        asked.append(args[-1])  # create
        if len(asked) > 1:  # the second save: the folder lock is held elsewhere for the whole wait
            raise CheckpointBusyError("folder lock held by another save")
        return real(*args)

    monkeypatch.setattr(series, "allocate", allocate)

    def save(comm: ThreadComm) -> Any:
        return second_save(coordinator(comm, tmp_path), checkpoint_id="two")

    results = threads(3, save)
    assert all(isinstance(r, CheckpointBusyError) and r.phase == "plan" for r in results), results
    assert asked == [True, False]  # the first save allocates in its second round, the next in its guess, once


def test_a_guess_creates_no_folder_for_a_call_whose_arguments_differ(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> Any:  # rank 0's folder does not exist: it does not allocate in its guess
        target = tmp_path / ("fresh" if comm.rank == 0 else "other") / "deep" / "ckpt"
        return second_save(coordinator(comm, tmp_path), checkpoint_path=target)

    results = threads(3, save)
    assert all(isinstance(r, ArgumentMismatchError) for r in results), results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_the_kept_world_guesses_only_for_the_report_and_group_names_a_rank_sent() -> None:
    reports = tuple(local_report("host", {"dp": (0, 1)}, []) for _ in range(2))
    topology = Topology(world_size=2, groups={"dp": [(0, 1)]})
    world = AgreedWorld(reports, ("dp",), topology)
    assert world.guess(1, reports[1], ["dp"]) is topology
    assert world.guess(1, reports[1], ["tp"]) is None
    assert world.guess(1, local_report("other", {"dp": (0, 1)}, []), ["dp"]) is None
    assert world.guess(2, reports[1], ["dp"]) is None
    assert world.key == reports_key(list(reports)) != reports_key([reports[0], reports[1] + b"\0"])
    assert reports_key([b"ab", b"c"]) != reports_key([b"a", b"bc"])  # lengths are part of the key


def test_a_kept_world_checks_its_reports_against_its_topology() -> None:
    with pytest.raises(ValueError, match="3 reports for a topology of 2 ranks"):
        AgreedWorld((b"r",) * 3, (), Topology(world_size=2))
    with pytest.raises(TypeError, match="as bytes"):
        AgreedWorld(({"node": "h"},), (), Topology(world_size=1))  # type: ignore[arg-type]
