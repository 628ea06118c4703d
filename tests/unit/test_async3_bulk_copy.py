"""The bulk path of the async snapshot copy (distckpt.hostwalk, StateCopy's default) against its
per-tensor path (``StateCopy(..., bulk=False)``): the same copy for any state, the kept buffers
reused the same way, and the batched two-thread copy exact."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import distckpt.hostcopy as hostcopy
from distckpt.hostcopy import Kept, StateCopy
from distckpt.hostwalk import columns

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.int8, torch.int64, torch.bool, torch.complex64)


def _base(dtype: torch.dtype, numel: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.rand(numel, generator=gen) > 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(numel, generator=gen, dtype=dtype)
    return torch.randint(-100, 100, (numel,), generator=gen, dtype=dtype)


@st.composite
def _states(draw: st.DrawFn) -> Any:
    """Nested states of dicts (str and int keys), OrderedDicts, lists and tuples, whose tensors
    come from a few base tensors: the bases themselves (aliases when drawn twice), views of them
    (reshaped, transposed, strided, sliced: distinct views of the same bytes), empties, parameters,
    lazily conjugated or negative ones, next to plain leaves and NumPy arrays."""
    bases = [_base(draw(st.sampled_from(_DTYPES)), draw(st.integers(1, 24)) * 2, seed)
             for seed in range(draw(st.integers(1, 4)))]

    def tensor(pick: tuple[int, str]) -> torch.Tensor:
        base = bases[pick[0] % len(bases)]
        kind = pick[1]
        if kind == "view2d":
            return base.view(2, -1)
        if kind == "transposed":
            return base.view(2, -1).t()
        if kind == "strided":
            return base[::2]
        if kind == "head":
            return base[: max(1, base.numel() // 2)]
        if kind == "empty":
            return torch.empty(0, 3, dtype=base.dtype)
        if kind == "param":
            return torch.nn.Parameter(base.clone(), requires_grad=base.dtype.is_floating_point)
        if kind == "conj":
            return base.conj() if base.is_complex() else base
        if kind == "neg":
            return base.conj().imag if base.is_complex() else base
        if kind == "zero_d":
            return base[0]
        return base

    tensors = st.tuples(st.integers(0, 3), st.sampled_from(
        ["base", "base", "base", "view2d", "transposed", "strided", "head", "empty", "param", "conj", "neg",
         "zero_d"])).map(tensor)
    plain = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=3),
                      st.just(b"raw"), st.just(torch.float16), st.just(np.arange(3, dtype=np.float32)))
    keys = st.one_of(st.text(max_size=4), st.integers(0, 20))

    def ordered(d: dict[Any, Any]) -> OrderedDict[Any, Any]:
        out = OrderedDict(d)
        out._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
        return out

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(st.dictionaries(keys, children, max_size=5), st.lists(children, max_size=5),
                         st.lists(children, max_size=3).map(tuple),
                         st.dictionaries(keys, children, max_size=4).map(ordered))

    leaves = st.one_of(tensors, tensors, plain)
    return draw(st.recursive(leaves, extend, max_leaves=30))


def _same(a: Any, b: Any, pairs: dict[int, int], state: Any) -> None:
    """``a`` and ``b`` are the same copy of ``state``: same containers, keys and leaves, equal
    tensors (never the live one) and the same aliasing (``pairs``: id in a -> id in b)."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert pairs.setdefault(id(a), id(b)) == id(b)
        assert a.dtype == b.dtype == state.dtype and a.shape == b.shape == state.shape
        assert torch.equal(a, b) and torch.equal(a, state.resolve_conj().resolve_neg())
        assert a.is_contiguous() and not a.requires_grad and a.grad_fn is None
        assert state.numel() == 0 or (a.data_ptr() != state.data_ptr() and b.data_ptr() != state.data_ptr())
    elif isinstance(a, dict):
        assert list(a) == list(b) == list(state)
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None) == getattr(state, "_metadata", None)
        for k in a:
            _same(a[k], b[k], pairs, state[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) == len(state)
        for x, y, s in zip(a, b, state, strict=True):
            _same(x, y, pairs, s)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b) and a is not state and b is not state
    else:
        assert a == b or (a is b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=_states())
def test_the_bulk_copy_of_any_state_is_the_copy_the_per_tensor_walk_makes(state: Any) -> None:
    bulk, general = StateCopy(state), StateCopy(state, bulk=False)
    assert bulk.nbytes == general.nbytes and len(bulk.targets) == len(general.targets)
    assert all(x is y for x, y in zip(bulk.sources, general.sources, strict=True))
    bulk.fill()
    general.fill()
    pairs: dict[int, int] = {}
    _same(bulk.state, general.state, pairs, state)
    assert len(set(pairs.values())) == len(pairs)  # one-to-one: the same aliasing


def _plain_state(shapes: list[tuple[int, ...]]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(len(shapes))
    return {"model": {f"w{i}": torch.randn(*s, generator=gen) for i, s in enumerate(shapes)},
            "optim": {"state": {i: {"step": torch.tensor(3.0), "m": torch.randn(*s, generator=gen)}
                                for i, s in enumerate(shapes)}, "groups": [{"lr": 0.1, "params": [0, 1]}]}}


def test_a_plain_state_takes_the_bulk_path_and_its_next_copy_reuses_every_kept_buffer() -> None:
    kept = Kept()
    state = _plain_state([(3, 4), (5,), (2, 2)])
    first = StateCopy(state, kept)
    first.fill()
    assert kept.columns is not None and kept.columns[0] == first.targets  # the bulk path's columns
    with torch.no_grad():
        state["model"]["w0"].add_(1)
    second = StateCopy(state, kept)
    assert second.targets == first.targets and not second._fresh  # every buffer kept, none allocated
    second.fill()
    assert torch.equal(second.state["model"]["w0"], state["model"]["w0"])


@pytest.mark.parametrize("change", ["shape", "dtype"])
def test_kept_buffers_are_reused_by_position_where_dtype_and_shape_still_match_on_both_paths(change: str) -> None:
    before = _plain_state([(3, 4), (5,), (2, 2)])
    after = _plain_state([(3, 4), (6,), (2, 2)] if change == "shape" else [(3, 4), (5,), (2, 2)])
    if change == "dtype":
        after["model"]["w2"] = after["model"]["w2"].double()
    reused = []
    for bulk in (True, False):
        kept = Kept()
        first = StateCopy(before, kept, bulk=bulk)
        first.fill()
        second = StateCopy(after, kept, bulk=bulk)
        second.fill()
        reused.append([a is b for a, b in zip(first.targets, second.targets, strict=True)])
        _same(second.state, second.state, {}, after)
    # model w0 w1 w2, then step and m per parameter: w1 and m1 change their shape, or w2 its dtype
    expected = [True, False, True, True, True, True, False, True, True] if change == "shape" else \
        [True, True, False, True, True, True, True, True, True]
    assert reused[0] == reused[1] == expected


def test_columns_kept_by_the_bulk_path_are_not_trusted_once_a_buffer_was_replaced() -> None:
    kept = Kept()
    state = _plain_state([(4,), (4,)])
    StateCopy(state, kept).fill()
    assert kept.columns is not None
    cols = columns(kept.columns[0])
    assert cols is not None and kept.reusable(cols) is not None
    kept[1] = torch.empty(4)  # as the general encoder does when it keeps a buffer of its own
    assert kept.reusable(cols) is None
    again = StateCopy(state, kept)
    again.fill()
    _same(again.state, again.state, {}, state)
    assert again.targets[1] is kept[1]


@pytest.mark.parametrize("state", [
    {"a": torch.ones(3), "b": torch.ones(2, 3)[:, 0]},  # strided
    {"a": torch.ones(3), "alias": None},  # an alias (filled in below)
    {"a": torch.ones(3), "empty": torch.empty(0)},
    {"a": torch.ones(3), "t": (torch.ones(2),)},  # a tensor right inside a tuple: the per-tensor walk
])
def test_states_with_aliases_empties_or_tensors_in_tuples_copy_the_same_through_the_per_tensor_path(
        state: dict[str, Any]) -> None:
    if "alias" in state:
        state["alias"] = state["a"]
    kept = Kept()
    copy = StateCopy(state, kept)
    copy.fill()
    general = StateCopy(state, bulk=False)
    general.fill()
    _same(copy.state, general.state, {}, state)


def test_many_small_tensors_copied_in_batches_by_two_threads_arrive_whole_without_autograd(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcopy, "_CHUNK", 1000)  # batches of a few tensors each, in both threads
    gen = torch.Generator().manual_seed(5)
    state: dict[str, Any] = {f"p{i}": torch.nn.Parameter(torch.randn(7 + i % 5, generator=gen)) for i in range(300)}
    state["strided"] = torch.randn(40, generator=gen)[::3]
    state["conj"] = torch.randn(9, dtype=torch.complex64, generator=gen).conj()
    for bulk in (True, False):
        copy = StateCopy(state, bulk=bulk)
        assert len(hostcopy._batches(copy._sizes)) > 10
        copy.fill()
        for key, live in state.items():
            got = copy.state[key]
            assert torch.equal(got, live.detach().resolve_conj()) and not got.requires_grad and got.grad_fn is None


@pytest.mark.parametrize("sizes", [[], [5], [1000] * 3, [1] * 50 + [5000] + [3] * 20, [4096] * 64, [3] * 7000])
def test_batches_cover_every_tensor_once_in_order(sizes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostcopy, "_CHUNK", 4096)
    batches = hostcopy._batches(sizes)
    assert [i for a, b in batches for i in range(a, b)] == list(range(len(sizes)))
    assert all(a < b for a, b in batches)
    if sum(sizes) >= 2 * 4096:
        assert len(batches) > 1


def test_a_lazily_conjugated_or_negated_view_of_copied_bytes_keeps_its_own_values() -> None:
    base = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    state = {"a": base, "b": base.conj(), "c": base.imag, "d": base.conj().imag}  # b, d: same bytes, other values
    for bulk in (True, False):
        copy = StateCopy(state, bulk=bulk)
        copy.fill()
        assert len({id(t) for t in copy.state.values()}) == 4
        assert all(torch.equal(copy.state[k], v.resolve_conj().resolve_neg()) for k, v in state.items())


def test_an_async_save_of_a_tensor_and_its_conjugate_view_writes_what_a_sync_save_writes(tmp_path: Any) -> None:
    from distckpt import CheckpointCoordinator, StateComponent
    from tests.helpers import Box

    base = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    coord = CheckpointCoordinator([StateComponent("s", Box({"a": base, "b": base.conj()}), "global")],
                                  output_dir=tmp_path)
    sync = coord.save_checkpoint(checkpoint_id="sync")
    handle = coord.save_checkpoint(checkpoint_id="async", async_save=True)
    handle.result(30)
    target = Box({"a": torch.zeros(3, dtype=torch.complex64), "b": torch.zeros(3, dtype=torch.complex64)})
    loader = CheckpointCoordinator([StateComponent("s", target, "global")], output_dir=tmp_path)
    for path in (sync, handle.path):
        loader.load_checkpoint(path)
        assert torch.equal(target.state["b"], base.conj().resolve_conj())


def test_buffers_of_a_copy_that_was_never_filled_are_not_trusted_by_the_next_copy() -> None:
    kept = Kept()
    state = _plain_state([(3, 4), (5,)])
    StateCopy(state, kept)  # a snapshot that failed before its copy got storage (another state raised, say)
    again = StateCopy(state, kept)
    again.fill()
    _same(again.state, again.state, {}, state)
    third = StateCopy(state, kept)  # and once filled, its buffers are kept
    assert third.targets == again.targets and not third._fresh

