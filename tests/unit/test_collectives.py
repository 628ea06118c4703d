from __future__ import annotations

import os

import pytest

from distckpt import CrossRankError, IntegrityError
from distckpt.collectives import LocalComm, describe_exception, exchange, local_node_id
from distckpt.testing import ThreadComm
from tests.helpers import threads


def test_exchange_returns_every_ranks_result_in_rank_order() -> None:
    assert threads(3, lambda c: exchange(c, "plan", lambda: c.rank * 10)) == [[0, 10, 20]] * 3


def test_one_failing_rank_makes_every_rank_raise_the_same_class_naming_it() -> None:
    def fn(c: ThreadComm) -> object:
        def work() -> int:
            if c.rank == 1:
                raise IntegrityError("f.safetensors: checksum mismatch")
            return 0
        return exchange(c, "read", work)

    results = threads(3, fn)
    assert all(type(r) is IntegrityError for r in results)
    assert all(r.failures == {1: "IntegrityError: f.safetensors: checksum mismatch"} and r.phase == "read" for r in results)


def test_different_failures_become_a_cross_rank_error_listing_each_rank() -> None:
    def fn(c: ThreadComm) -> object:
        def work() -> int:
            if c.rank == 0:
                raise KeyError("a")
            if c.rank == 2:
                raise OSError(28, "No space left on device")
            return 0
        return exchange(c, "write", work)

    results = threads(3, fn)
    assert all(type(r) is CrossRankError for r in results)
    assert results[0].failures == {0: "KeyError: 'a'", 2: "OSError: [Errno 28] No space left on device"}
    assert "rank 2: OSError: [Errno 28]" in str(results[0])


def test_a_world_of_one_needs_no_torch_distributed() -> None:
    assert exchange(LocalComm(), "plan", lambda: "x") == ["x"]
    with pytest.raises(CrossRankError, match="boom"):
        exchange(LocalComm(), "plan", lambda: (_ for _ in ()).throw(RuntimeError("boom")))


def test_node_identity_prefers_group_rank_then_node_rank_then_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROUP_RANK", "3")
    monkeypatch.setenv("NODE_RANK", "9")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_node_id() == "GROUP_RANK=3"
    monkeypatch.delenv("GROUP_RANK")
    assert local_node_id() == "NODE_RANK=9"
    monkeypatch.delenv("NODE_RANK")
    assert local_node_id().startswith("host=") and os.uname().nodename in local_node_id()


def test_describe_exception_keeps_nested_failures() -> None:
    err = IntegrityError("bad", failures={4: "x"})
    assert describe_exception(err) == "IntegrityError: bad (rank 4: x)"
