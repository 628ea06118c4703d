"""Cross-rank errors group identical per-rank messages (issue 14)."""

from __future__ import annotations

import pickle

import pytest

from distckpt.collectives import describe_exception, merged_error
from distckpt.errors import (
    ComponentMismatchError,
    CrossRankError,
    IntegrityError,
    TopologyMismatchError,
    group_ranks,
    on_every_rank,
    rank_span,
)

TORCH_TEXT = (
    "RuntimeError: Error(s) in loading state_dict for Linear:\n"
    "\tsize mismatch for weight: copying a param with shape torch.Size([4, 8]) from checkpoint, "
    "the shape in current model is torch.Size([6, 8]).\n"
    "\tsize mismatch for bias: copying a param with shape torch.Size([4]) from checkpoint, "
    "the shape in current model is torch.Size([6])."
)


@pytest.mark.parametrize(("ranks", "text"), [
    ([3], "rank 3"),
    ([0, 1, 2, 3], "ranks 0-3"),
    ([5, 0, 2, 1, 7, 8, 9], "ranks 0-2, 5, 7-9"),
    ([4, 6], "ranks 4, 6"),
])
def test_rank_span_writes_ranks_as_runs(ranks: list[int], text: str) -> None:
    assert rank_span(ranks) == text


def test_an_identical_message_from_four_ranks_appears_once_with_a_rank_range() -> None:
    err = merged_error("read", {r: TORCH_TEXT for r in range(4)}, {"RuntimeError"})
    text = str(err)
    assert type(err) is CrossRankError and err.phase == "read" and set(err.failures) == {0, 1, 2, 3}
    assert text.count("size mismatch for weight") == 1
    assert text.startswith("checkpoint read failed on ranks 0-3: RuntimeError: Error(s)")


def test_different_messages_are_grouped_by_text_in_the_order_of_their_lowest_rank() -> None:
    failures = {0: "A", 1: "B", 2: "A", 3: "A", 5: "B"}
    err = merged_error("write", failures, {"OSError"})
    assert str(err).splitlines() == [
        "checkpoint write failed on ranks 0-3, 5 (2 different errors):",
        "  ranks 0, 2-3: A",
        "  ranks 1, 5: B",
    ]
    assert group_ranks(failures) == [((0, 2, 3), "A"), ((1, 5), "B")]


def test_notes_shared_by_several_ranks_are_grouped_too() -> None:
    err = merged_error("read", {0: "boom"}, {"OSError"}, notes={0: "changed no live state",
                                                               1: "changed no live state"})
    assert "\n  ranks 0-1 changed no live state" in err.message
    assert err.message.count("changed no live state") == 1


def test_a_multiline_message_in_a_group_is_indented_under_its_ranks() -> None:
    err = CrossRankError("x", failures={0: "one\ntwo", 1: "other"})
    assert str(err).splitlines() == ["x", "  rank 0: one", "    two", "  rank 1: other"]


def test_a_nested_errors_failures_are_grouped_in_its_one_line_description() -> None:
    inner = IntegrityError("bad", failures={0: "x", 1: "x", 2: "y"})
    assert describe_exception(inner) == "IntegrityError: bad (ranks 0-1: x; rank 2: y)"


def test_grouped_errors_survive_pickling_between_processes() -> None:
    err = merged_error("plan", {r: "same" for r in range(3)}, {"ValueError"})
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.failures == err.failures and back.phase == "plan"


def test_on_every_rank_sets_phase_and_names_every_rank_when_a_check_named_none() -> None:
    err = on_every_rank(TopologyMismatchError("group 'dp' is not a partition"), "plan", 4)
    assert type(err) is TopologyMismatchError and err.phase == "plan"
    assert err.failures == {r: "group 'dp' is not a partition" for r in range(4)}
    assert str(err) == "group 'dp' is not a partition\n  (ranks 0-3)"
    kept = ComponentMismatchError("differ", failures={2: "does not declare 'x'"})
    filled = on_every_rank(kept, "resolve", 4)
    assert filled.failures == {2: "does not declare 'x'"} and filled.phase == "resolve"
