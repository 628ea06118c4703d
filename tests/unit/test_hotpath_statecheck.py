"""The state check's single walk: paths are built only for a difference, and still read as before.

:func:`distckpt.statecheck.check_state` keeps the keys that lead to each node and spells the
path only when it reports a line; tensors stored natively inside a mapping are checked
inline. These tests pin the path text deep in nested containers (int keys, tuples, lists,
an empty key), the order of the lines, and that a live tensor where the skeleton has a
container is left alone, as the general walk leaves it.
"""

from __future__ import annotations

from typing import Any

import torch

from distckpt import codec
from distckpt.statecheck import check_state


def _layouts(state: Any) -> list[codec.FileLayout]:
    encoded = codec.encode(state)
    return [codec.parse_header(encoded.to_bytes(), encoded.total_size)]


def _optimizer(rows: int) -> dict[str, Any]:
    return {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(rows)} for i in range(3)},
            "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}


def test_a_difference_deep_in_an_optimizer_state_is_named_by_its_full_path() -> None:
    live = _optimizer(4)
    live["state"][2]["exp_avg"] = torch.zeros(5)
    live["state"][0]["step"] = torch.tensor(1.0, dtype=torch.float64)
    assert check_state("o", _layouts(_optimizer(4)), live) == [
        "component 'o', entry 'state.0.step': saved dtype float32, live dtype float64 (shape [])",
        "component 'o', entry 'state.2.exp_avg': saved shape [4] (float32), live shape [5] (float32)",
    ]


def test_paths_through_lists_tuples_and_an_empty_key_read_as_the_general_walk_spells_them() -> None:
    saved = {"": {"a": [torch.zeros(2), (torch.zeros(3), {"deep": torch.zeros(1)})]}}
    live = {"": {"a": [torch.zeros(2), (torch.zeros(4), {"deep": torch.zeros(2)})]}}
    assert check_state("m", _layouts(saved), live) == [
        "component 'm', entry \"''.a.1.0\": saved shape [3] (float32), live shape [4] (float32)",
        "component 'm', entry \"''.a.1.1.deep\": saved shape [1] (float32), live shape [2] (float32)",
    ]


def test_a_live_tensor_where_a_container_was_saved_is_left_to_the_read_phase() -> None:
    saved = {"w": {"inner": torch.zeros(2)}, "v": (torch.zeros(1),), "t": torch.zeros(3)}
    live = {"w": torch.zeros(2), "v": torch.zeros(1), "t": torch.zeros(3)}
    assert check_state("m", _layouts(saved), live, strict=False) == []


def test_a_key_set_difference_comes_before_the_entries_under_it() -> None:
    saved = {"m": {"a": torch.zeros(2), "b": torch.zeros(2)}}
    live = {"m": {"a": torch.zeros(3), "c": torch.zeros(2)}}
    assert check_state("k", _layouts(saved), live) == [
        "component 'k', entries under 'm': live state has [c] that the checkpoint lacks and checkpoint has [b] "
        "that the live state lacks",
        "component 'k', entry 'm.a': saved shape [2] (float32), live shape [3] (float32)",
    ]
