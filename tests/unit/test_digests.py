from __future__ import annotations

import copy

import pytest
import torch

from distckpt import ValidationLevel
from distckpt.digests import (
    STRUCTURE,
    compare_replicas,
    describe_difference,
    digest_state,
    quick_sample_indices,
)


def optimizer_state() -> dict:
    return {"state": {0: {"exp_avg": torch.randn(4, 4), "step": torch.tensor(3.0)},
                      1: {"exp_avg": torch.randn(8, dtype=torch.bfloat16)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}]}


@pytest.mark.parametrize("level", [ValidationLevel.TENSOR, ValidationLevel.FULL])
def test_tensor_level_sees_optimizer_state_at_any_depth(level: ValidationLevel) -> None:
    a = optimizer_state()
    b = copy.deepcopy(a)
    b["state"][0]["exp_avg"][3, 3] += 1e-6
    da, db = digest_state(a, level), digest_state(b, level)
    assert [k for k in da if da[k] != db[k]] == ["state.0.exp_avg"]


def test_bfloat16_tensors_are_digested_and_compared() -> None:
    a = optimizer_state()
    b = copy.deepcopy(a)
    b["state"][1]["exp_avg"][0] = 7
    assert digest_state(a, "tensor")["state.1.exp_avg"] != digest_state(b, "tensor")["state.1.exp_avg"]


def test_non_tensor_leaves_are_compared() -> None:
    a = optimizer_state()
    b = copy.deepcopy(a)
    b["param_groups"][0]["lr"] = 0.2
    assert digest_state(a, "quick")["param_groups.0.lr"] != digest_state(b, "quick")["param_groups.0.lr"]


def test_quick_samples_the_whole_tensor_not_its_head() -> None:
    idx = quick_sample_indices(1_000_000)
    assert idx[0] == 0 and idx[-1] == 999_999 and len(idx) <= 64
    a = {"w": torch.zeros(1_000_000)}
    b = copy.deepcopy(a)
    b["w"][-1] = 1
    assert digest_state(a, "quick")["w"] != digest_state(b, "quick")["w"]


@pytest.mark.parametrize("change", ["shape", "dtype", "key", "container"])
def test_quick_catches_any_change_of_structure_shape_or_dtype(change: str) -> None:
    a = {"w": torch.zeros(4, 4), "n": [1, 2]}
    b = {"shape": {"w": torch.zeros(16), "n": [1, 2]},
         "dtype": {"w": torch.zeros(4, 4, dtype=torch.float64), "n": [1, 2]},
         "key": {"v": torch.zeros(4, 4), "n": [1, 2]},
         "container": {"w": torch.zeros(4, 4), "n": (1, 2)}}[change]
    assert digest_state(a, "quick")[STRUCTURE] != digest_state(b, "quick")[STRUCTURE]


def test_every_member_is_compared_with_every_other_member() -> None:
    same = digest_state({"w": torch.zeros(3)}, "tensor")
    other = digest_state({"w": torch.ones(3)}, "tensor")
    digests = {0: same, 1: same, 4: same, 5: other}
    mismatches = compare_replicas("model", [(0, 4), (1, 5)], digests)
    assert len(mismatches) == 1
    m = mismatches[0]
    assert m.replica_set == (1, 5) and m.groups == ((1,), (5,)) and m.entries == ("w",)
    assert "ranks grouped by digest: [1] | [5]" in m.describe()


def test_groups_are_ordered_largest_first() -> None:
    a, b = digest_state({"w": torch.zeros(1)}, "tensor"), digest_state({"w": torch.ones(1)}, "tensor")
    (m,) = compare_replicas("k", [(0, 1, 2)], {0: b, 1: a, 2: a})
    assert m.groups == ((1, 2), (0,))


def test_full_level_reports_how_far_apart_tensors_are() -> None:
    a = torch.zeros(10)
    b = a.clone()
    b[2] = 0.5
    b[7] = -2
    assert describe_difference(a, b) == "max abs difference 2, 2 of 10 elements differ"
    assert "3 of 4" in describe_difference(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 0, 0]))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({1: torch.zeros(2), "1": torch.ones(2)}, {1: torch.ones(2), "1": torch.ones(2)}),
        ({"a.b": torch.zeros(2), "a": {"b": torch.ones(2)}}, {"a.b": torch.ones(2), "a": {"b": torch.ones(2)}}),
        ({"": {"b": torch.zeros(2)}, "b": torch.ones(2)}, {"": {"b": torch.ones(2)}, "b": torch.ones(2)}),
    ],
    ids=["int-and-str", "dotted", "empty-key"],
)
def test_entries_behind_look_alike_keys_never_share_a_digest(a: dict, b: dict) -> None:
    da, db = digest_state(a, "tensor"), digest_state(b, "tensor")
    assert len(da) == 3 and da != db


def test_keys_with_lone_surrogates_digest_without_crashing() -> None:
    assert digest_state({"\ud800": torch.ones(1)}, "tensor")


def test_one_element_strided_views_digest_and_encode() -> None:
    from distckpt.codec import decode, encode

    for t in (torch.arange(2.0)[::2], torch.tensor(3.0).expand(1)):
        assert digest_state({"w": t}, "tensor")
        assert torch.equal(decode(bytearray(encode({"w": t}).to_bytes()))["w"], t)


def test_quick_hashes_tensors_up_to_1_mib_whole_and_samples_larger_ones() -> None:
    small = torch.zeros(1024 * 1024 // 4)  # exactly 1 MiB: every element counts
    changed = small.clone()
    changed[12345] = 1.0
    assert digest_state({"w": small}, "quick")["w"] != digest_state({"w": changed}, "quick")["w"]
    large = torch.zeros(1024 * 1024 // 4 + 1)
    unsampled = next(i for i in range(large.numel()) if i not in set(quick_sample_indices(large.numel())))
    moved = large.clone()
    moved[unsampled] = 1.0
    assert digest_state({"w": large}, "quick")["w"] == digest_state({"w": moved}, "quick")["w"]
    assert digest_state({"w": large}, "tensor")["w"] != digest_state({"w": moved}, "tensor")["w"]
