"""The Comm protocols (issue 13 item 4): what a world must offer, checked before anything happens,
and peers' tracebacks travelling with their failures."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from distckpt import CheckpointCoordinator, CheckpointError, StateComponent
from distckpt.collectives import announce, exchange
from distckpt.testing import ThreadComm, ThreadWorld
from distckpt.transport import Comm, ForkingComm, LocalComm, SetBroadcastComm
from tests.helpers import Box, threads


class _PlainComm:
    """A world of one offering only the base :class:`Comm`: no fork, no broadcast within sets."""

    rank = 0
    world_size = 1

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any, phase: str) -> Any:
        return obj

    def group_members(self, group: Any) -> tuple[int, ...]:
        return (0,)

    def node_id(self) -> str:
        return "node=0"


def test_the_worlds_distckpt_provides_implement_every_comm_protocol() -> None:
    thread_comm = ThreadWorld(2).comm(0)
    for comm in (LocalComm(), thread_comm):
        assert isinstance(comm, Comm) and isinstance(comm, ForkingComm) and isinstance(comm, SetBroadcastComm)
    assert isinstance(_PlainComm(), Comm)
    assert not isinstance(_PlainComm(), ForkingComm) and not isinstance(_PlainComm(), SetBroadcastComm)


def test_read_and_broadcast_with_a_comm_that_cannot_broadcast_in_sets_is_refused_at_construction(
        tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"SetBroadcastComm.*_PlainComm does not"):
        CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], dist=_PlainComm(),
                              output_dir=tmp_path, load_strategy="read_and_broadcast")
    # the default strategy needs only the base protocol
    coordinator = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], dist=_PlainComm(),
                                        output_dir=tmp_path)
    path = coordinator.save_checkpoint()
    assert coordinator.load_checkpoint(path).loaded == ("a",)


def test_async_save_with_a_comm_that_cannot_fork_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    coordinator = CheckpointCoordinator([StateComponent("a", Box({"x": 1}), "global")], dist=_PlainComm(),
                                        output_dir=tmp_path)
    with pytest.raises(TypeError, match=r"async_save needs a Comm implementing distckpt\.transport\.ForkingComm"):
        coordinator.save_checkpoint(async_save=True)
    assert list(tmp_path.iterdir()) == []


def _fail_on_rank_one_deep_inside(comm: ThreadComm) -> int:
    if comm.rank == 1:
        raise ValueError("the data loader lost its place")
    return comm.rank


def test_a_peers_traceback_travels_with_its_failure_and_is_logged_at_debug_where_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")
    results = threads(3, lambda c: exchange(c, "plan", lambda: _fail_on_rank_one_deep_inside(c)))
    assert all(isinstance(r, CheckpointError) and set(r.failures) == {1} for r in results)
    peer_logs = [r for r in caplog.records if r.levelno == logging.DEBUG
                 and "rank 1 failed in plan; its traceback" in r.getMessage()]
    assert len(peer_logs) == 2  # ranks 0 and 2 log rank 1's traceback; rank 1 logs its own with exc_info
    for record in peer_logs:
        text = record.getMessage()
        assert "_fail_on_rank_one_deep_inside" in text and "ValueError: the data loader lost its place" in text


def test_rank_zeros_traceback_travels_with_an_announced_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="distckpt")

    def on_rank_zero() -> None:
        raise OSError(5, "injected I/O error while publishing")

    results = threads(2, lambda c: announce(c, "commit", on_rank_zero))
    assert all(isinstance(r, CheckpointError) and set(r.failures) == {0} for r in results)
    peer_logs = [r.getMessage() for r in caplog.records if "rank 0 failed in commit; its traceback" in r.getMessage()]
    assert len(peer_logs) == 1 and "on_rank_zero" in peer_logs[0] and "injected I/O error" in peer_logs[0]
