"""In-place targets checked a column at a time: the same choice as tensor by tensor, whatever
is wrong with one live tensor (dtype, shape, layout, device, lazy conjugation or negation,
an alias, a subclass), and the fast choice actually taken when nothing is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from distckpt import codec
from distckpt.codec import targets


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(6)
    return {
        "w": torch.randn(4, 3, generator=g),
        "h": torch.randn(5, generator=g).half(),
        "c": torch.randn(3, dtype=torch.complex64, generator=g),
        "step": torch.tensor(3.0),
        "opt": {i: {"m": torch.randn(6, generator=g), "v": torch.randn(2, 3, generator=g)} for i in range(4)},
        "p": torch.nn.Parameter(torch.randn(7, generator=g)),
    }


def _layout(state: Any) -> codec.FileLayout:
    data = codec.encode(state).to_bytes()
    return codec.parse_header(memoryview(data), len(data))


class _Sub(torch.Tensor):
    pass


_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "nothing": lambda s: None,
    "dtype": lambda s: s.__setitem__("w", s["w"].double()),
    "shape": lambda s: s.__setitem__("w", s["w"].reshape(3, 4).clone()),
    "transposed": lambda s: s.__setitem__("w", s["w"].t().contiguous().t()),
    "strided-slice": lambda s: s["opt"][2].__setitem__("m", torch.zeros(12)[::2]),
    "conjugated": lambda s: s.__setitem__("c", s["c"].conj()),
    "negated": lambda s: s.__setitem__("h", torch._neg_view(s["h"])),
    "meta": lambda s: s.__setitem__("step", torch.empty((), device="meta")),
    "sparse": lambda s: s["opt"][1].__setitem__("m", s["opt"][1]["m"].to_sparse()),
    "alias": lambda s: s["opt"][3].__setitem__("m", s["opt"][0]["m"]),
    "overlap": lambda s: s["opt"][3].__setitem__("v", s["opt"][0]["v"].view(-1)[:6].view(2, 3)),
    "subclass": lambda s: s["opt"][0].__setitem__("m", s["opt"][0]["m"].as_subclass(_Sub)),
    "missing": lambda s: s["opt"].pop(2),
    "not-a-tensor": lambda s: s.__setitem__("p", 7),
    "empty": lambda s: s.__setitem__("w", torch.zeros(0, 3)),
}


def _choices(saved: dict[str, Any], live: dict[str, Any]) -> tuple[Any, Any, codec.InPlace]:
    layout = _layout(saved)
    found: list[Any] = []
    targets._pair_tensors(layout.skeleton, live, found)
    index = {name: i for i, name in enumerate(layout.names)}
    return (targets._picked_at_once(found, layout, index), targets._picked_one_by_one(found, layout, index),
            codec.in_place(layout.skeleton, layout, live))


_UNSAVABLE = {"meta", "sparse", "subclass"}  # refused by the encoder: changed on the live side only


@pytest.mark.parametrize(("change", "side"), [(c, "live") for c in _CHANGES]
                         + [(c, "saved") for c in _CHANGES if c not in _UNSAVABLE])
def test_the_column_check_chooses_as_the_tensor_by_tensor_check(change: str, side: str) -> None:
    saved, live = _state(), _state()
    _CHANGES[change](live if side == "live" else saved)
    at_once, one_by_one, chosen = _choices(saved, live)
    if change == "nothing":
        assert at_once is not None  # the fast choice is taken when every tensor qualifies
        assert len(chosen.indices) == 13
    if at_once is not None:
        picked, tensors, starts, foreign = at_once
        assert (picked, starts, foreign) == (one_by_one[0], one_by_one[2], one_by_one[3])
        assert all(a is b for a, b in zip(tensors, one_by_one[1], strict=True))
    elif change not in ("nothing",):
        assert len(chosen.indices) <= 13


def test_in_place_gives_the_same_targets_with_the_column_check_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for change in _CHANGES:
        saved, live = _state(), _state()
        _CHANGES[change](live)
        layout = _layout(saved)
        fast = codec.in_place(layout.skeleton, layout, live)
        with monkeypatch.context() as patch:
            patch.setattr(targets, "_picked_at_once", lambda *args: None)
            slow = codec.in_place(layout.skeleton, layout, live)
        assert fast.indices == slow.indices, change
        assert fast.foreign == slow.foreign, change
        assert fast.tensors.keys() == slow.tensors.keys(), change
        assert all(fast.tensors[k] is slow.tensors[k] for k in fast.tensors), change
        assert [bytes(v) for v in fast.views] == [bytes(v) for v in slow.views], change


def _entry(tmp_path: Any, state: Any) -> Any:
    from distckpt import hashing
    from distckpt.manifest import FileEntry

    data = codec.encode(state).to_bytes()
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / "f.safetensors").write_bytes(data)
    return FileEntry(path="c/f.safetensors", ranks=(0,), writer=0, size_bytes=len(data),
                     checksum=hashing.checksum_of(data))


@pytest.mark.parametrize("gap", ["none", "first", "middle", "last", "every-other"])
def test_every_value_lands_whether_the_in_place_targets_lie_back_to_back_or_not(tmp_path: Any, gap: str) -> None:
    from distckpt.reading import read_component

    saved = {f"t{i}": torch.full((3 + i % 2,), float(i)) for i in range(40)}
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    keep = {"none": [], "first": [0], "middle": [17], "last": [39], "every-other": list(range(0, 40, 2))}[gap]
    for i in keep:  # another dtype: read into the scratch buffer, not in place
        live[f"t{i}"] = live[f"t{i}"].double()
    before = dict(live)
    state = read_component(str(tmp_path), [_entry(tmp_path, saved)], live)
    for k, v in saved.items():
        assert torch.equal(state[k].double(), v.double()), k
        assert (state[k] is before[k]) == (int(k[1:]) not in keep), k  # in place unless its dtype differs


def test_a_tensor_in_two_parts_is_refused_even_when_every_entry_was_read_in_place() -> None:
    from distckpt.errors import IntegrityError

    layout = codec.FileLayout(data_start=0, names=("a", "b"), dtypes=(torch.float32,) * 2, shapes=((1,),) * 2,
                              begins=(0, 4), ends=(4, 8), skeleton=None)
    other = codec.FileLayout(data_start=0, names=("b",), dtypes=(torch.float32,), shapes=((1,),),
                             begins=(0,), ends=(4,), skeleton=None)
    overrides = {"a": torch.ones(1), "b": torch.ones(1)}
    buffer = memoryview(bytearray(8))
    assert codec.assemble([(layout, buffer)], overrides) == overrides
    with pytest.raises(IntegrityError, match="'b' appears twice"):
        codec.assemble([(layout, buffer), (other, buffer)], overrides)
