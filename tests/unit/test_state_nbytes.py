"""state_nbytes: the bytes of tensor data a state holds, as the plan phase sizes balanced writes by it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt.codec.encoder import state_nbytes

_DTYPES = (torch.float32, torch.float16, torch.int64, torch.uint8, torch.complex64, torch.bool)


def _expected(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_expected(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_expected(v) for v in obj)
    return 0


@st.composite
def _leaves(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["tensor", "param", "view", "scalar", "none", "text"]))
    if kind in ("tensor", "param", "view"):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        t = torch.zeros(shape, dtype=draw(st.sampled_from(_DTYPES)))
        if kind == "param":
            return torch.nn.Parameter(torch.zeros(shape), requires_grad=draw(st.booleans()))
        return t.t() if kind == "view" and t.dim() == 2 else t
    return {"scalar": 3.5, "none": None, "text": "abc"}[kind]


_states = st.recursive(
    _leaves(),
    lambda inner: st.one_of(st.dictionaries(st.text(max_size=3), inner, max_size=4),
                            st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
                            st.dictionaries(st.integers(0, 9), inner, max_size=3).map(OrderedDict)),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_states)
def test_state_nbytes_counts_every_tensor_byte_in_any_nesting(state: Any) -> None:
    assert state_nbytes(state) == _expected(state)


def test_state_nbytes_counts_a_non_contiguous_view_by_its_elements_not_its_storage() -> None:
    base = torch.zeros(10, 10)
    assert state_nbytes({"v": base[:, :2], "p": torch.nn.Parameter(torch.zeros(3))}) == 10 * 2 * 4 + 3 * 4
