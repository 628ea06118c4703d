"""The public pattern kit (distckpt.testing.check_pattern) over the built-ins, and against buggy patterns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from distckpt import Pattern, Topology, register_pattern
from distckpt.patterns import Global, PerGroup, PerNode, PerRank, Replicated
from distckpt.testing import check_pattern

KIT_EXAMPLES = 100


def one_group(topology: Topology) -> Pattern:
    """PerGroup over the first drawn group name (PER_RANK when none was drawn)."""
    return PerGroup(sorted(topology.groups)[0]) if topology.groups else PerRank()


def joined_groups(topology: Topology) -> Pattern:
    """PerGroup over every drawn group name: the join of their partitions."""
    return PerGroup(*sorted(topology.groups)) if topology.groups else Replicated()


@pytest.mark.parametrize("source", [Global(), Replicated(), PerRank(), PerNode(), one_group, joined_groups],
                         ids=["global", "replicated", "per_rank", "per_node", "per_group", "per_group_join"])
def test_every_builtin_pattern_keeps_every_promise_of_the_kit(source: object) -> None:
    check_pattern(source, max_examples=KIT_EXAMPLES)  # type: ignore[arg-type]


@register_pattern
class ForgetsLonelyNodes(Pattern):
    """Buggy on purpose: a node of one rank gets no replica set."""

    kind = "test_forgets_lonely_nodes"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [n for n in topology.nodes if len(n) > 1]


@register_pattern
@dataclass(frozen=True, eq=False)
class OddFileNames(Pattern):
    """Buggy on purpose: every set gets the same file name."""

    kind = "test_odd_file_names"
    stem: str = "same"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return topology.nodes

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return self.stem


class Unregistered(Pattern):
    kind = "test_unregistered"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [range(topology.world_size)]


def test_the_kit_catches_a_pattern_that_forgets_a_one_rank_node_naming_the_ranks() -> None:
    with pytest.raises(AssertionError, match=r"ranks \[\d+\] are in no replica set"):
        check_pattern(ForgetsLonelyNodes(), max_examples=50, shrink=False)


def test_the_kit_catches_file_names_that_collide_across_sets() -> None:
    with pytest.raises(AssertionError, match="not a safe file name distinct"):
        check_pattern(OddFileNames(), max_examples=50, shrink=False)


def test_the_kit_refuses_a_pattern_that_is_not_registered() -> None:
    with pytest.raises(AssertionError, match="not registered"):
        check_pattern(Unregistered(), max_examples=5)


@pytest.mark.multirank
@pytest.mark.timeout(600)
def test_the_builtins_keep_their_promises_on_real_gloo_worlds() -> None:
    for source in (Replicated(), PerNode(), one_group):
        check_pattern(source, max_examples=3, processes=True, max_world=4)  # type: ignore[arg-type]


def test_the_kit_reads_a_manifest_that_lists_its_files_as_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from distckpt import jsontext

    monkeypatch.setattr(jsontext, "TABLE_MIN_FILES", 2)  # what 1,024 sets or more do: a format 1.4 file_table
    check_pattern(PerRank(), max_examples=10)
