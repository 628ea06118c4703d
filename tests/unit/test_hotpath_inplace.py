"""The load's fast in-place path: which live tensors receive a file's bytes, and that every value lands.

:func:`distckpt.codec.in_place` picks the live tensors and gives one writable view of
each (slices of one span of addresses); :func:`distckpt.reading.read_component` reads
into them. These tests check the picking and, through a real file, the values that
land in every kind of live tensor: mixed dtypes, dtypes safetensors lacks, 0-d and
empty tensors, non-contiguous ones, aliases, views of one buffer, another shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distckpt import codec, hashing
from distckpt.manifest import FileEntry
from distckpt.reading import read_component


def _layout(state: Any) -> tuple[codec.FileLayout, bytes]:
    data = codec.encode(state).to_bytes()
    return codec.parse_header(memoryview(data), len(data)), data


def _write(tmp_path: Path, state: Any) -> tuple[str, FileEntry]:
    data = codec.encode(state).to_bytes()
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "f.safetensors").write_bytes(data)
    return str(tmp_path), FileEntry(path="s/f.safetensors", ranks=(0,), writer=0, size_bytes=len(data),
                                    checksum=hashing.checksum_of(data))


def _mixed() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "f32": torch.randn(5, 3, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "i64": torch.arange(9, dtype=torch.int64) * -3,
        "u8": torch.arange(5, dtype=torch.uint8),
        "flag": torch.tensor([True, False, True]),
        "c64": torch.randn(3, dtype=torch.complex64, generator=g),
        "c128": torch.randn(2, 2, dtype=torch.complex128, generator=g),  # no safetensors dtype: raw bytes
        "step": torch.tensor(41.0),  # 0-d
        "none": torch.zeros(0, 4),  # empty
        "nested": {"list": [torch.full((6,), 2.5), (torch.arange(3, dtype=torch.int32), 7)], "s": "x"},
    }


def _zeros_like(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros_like(v) for v in state]
    if isinstance(state, tuple):
        return tuple(_zeros_like(v) for v in state)
    return state


def _leaves(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        return {p: v for k, s in state.items() for p, v in _leaves(s, f"{path}.{k}").items()}
    if isinstance(state, (list, tuple)):
        return {p: v for i, s in enumerate(state) for p, v in _leaves(s, f"{path}.{i}").items()}
    return {path: state}


def _same(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if la.keys() != lb.keys():
        return False
    for k, x in la.items():
        y = lb[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def test_every_dtype_lands_in_the_live_tensors_themselves(tmp_path: Path) -> None:
    saved = _mixed()
    root, entry = _write(tmp_path, saved)
    live = _zeros_like(saved)
    pointers = {k: v.data_ptr() for k, v in _leaves(live).items() if isinstance(v, torch.Tensor) and v.numel()}
    state = read_component(root, [entry], live)
    assert _same(state, saved) and _same(live, saved)
    got = _leaves(state)
    for k, ptr in pointers.items():
        assert got[k].data_ptr() == ptr, k  # read in place, not copied


def test_the_picked_entries_are_exactly_the_matching_non_empty_plain_tensors() -> None:
    saved = _mixed()
    layout, _ = _layout(saved)
    live = _zeros_like(saved)
    found = codec.in_place(layout.skeleton, layout, live)
    assert list(found.indices) == sorted(found.indices)
    # every non-empty tensor (11 of them) is picked; the empty one is not
    assert len(found.indices) == 11 and not found.foreign
    for i, view in zip(found.indices, found.views, strict=True):
        assert len(view) == layout.ends[i] - layout.begins[i]
        assert not view.readonly


def test_views_cover_exactly_the_live_tensors_bytes() -> None:
    saved = {"a": torch.arange(4, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int16)}
    layout, _ = _layout(saved)
    live = {"a": torch.zeros(4), "b": torch.zeros(3, dtype=torch.int16)}
    found = codec.in_place(layout.skeleton, layout, live)
    for view in found.views:
        view[:] = b"\x01" * len(view)
    assert torch.equal(live["a"].view(torch.uint8), torch.ones(16, dtype=torch.uint8))
    assert torch.equal(live["b"].view(torch.uint8), torch.ones(6, dtype=torch.uint8))


def test_non_contiguous_and_other_shape_live_tensors_get_the_values_without_being_written(tmp_path: Path) -> None:
    saved = {"strided": torch.arange(8, dtype=torch.float32), "shape": torch.arange(6, dtype=torch.float32),
             "dtype": torch.arange(5, dtype=torch.float32), "t": torch.arange(6, dtype=torch.float32).view(2, 3)}
    root, entry = _write(tmp_path, saved)
    backing = torch.zeros(16)
    live = {"strided": backing[::2], "shape": torch.zeros(2, 3), "dtype": torch.zeros(5, dtype=torch.float64),
            "t": torch.zeros(3, 2).t()}  # transposed: same shape, not contiguous
    layout, _ = _layout(saved)
    assert codec.in_place(layout.skeleton, layout, live).indices == ()
    state = read_component(root, [entry], live)
    assert _same(state, saved)
    assert torch.equal(backing, torch.zeros(16)) and torch.equal(live["shape"], torch.zeros(2, 3))
    assert torch.equal(live["t"], torch.zeros(3, 2).t())


def test_a_live_alias_receives_one_entry_and_the_other_entry_keeps_its_own_bytes(tmp_path: Path) -> None:
    saved = {"a": torch.full((4,), 1.0), "b": torch.full((4,), 2.0)}  # two entries in the file
    root, entry = _write(tmp_path, saved)
    shared = torch.zeros(4)
    live = {"a": shared, "b": shared}  # tied in the live state
    layout, _ = _layout(saved)
    assert len(codec.in_place(layout.skeleton, layout, live).indices) == 1
    state = read_component(root, [entry], live)
    assert torch.equal(state["a"], saved["a"]) and torch.equal(state["b"], saved["b"])


def test_disjoint_views_of_one_buffer_are_both_read_in_place(tmp_path: Path) -> None:
    saved = {"a": torch.arange(4, dtype=torch.float32), "b": torch.arange(4, 10, dtype=torch.float32)}
    root, entry = _write(tmp_path, saved)
    flat = torch.zeros(10)
    live = {"a": flat[:4], "b": flat[4:]}
    state = read_component(root, [entry], live)
    assert torch.equal(flat, torch.arange(10, dtype=torch.float32))
    assert state["a"].data_ptr() == flat.data_ptr()


def test_overlapping_views_of_one_buffer_read_only_the_first_in_place(tmp_path: Path) -> None:
    saved = {"a": torch.arange(6, dtype=torch.float32), "b": torch.arange(10, 16, dtype=torch.float32)}
    root, entry = _write(tmp_path, saved)
    flat = torch.zeros(8)
    live = {"a": flat[:6], "b": flat[2:]}  # overlap on flat[2:6]
    layout, _ = _layout(saved)
    assert len(codec.in_place(layout.skeleton, layout, live).indices) == 1
    state = read_component(root, [entry], live)
    assert torch.equal(state["a"], saved["a"]) and torch.equal(state["b"], saved["b"])


def test_a_tensor_subclass_where_a_plain_tensor_was_saved_is_reported_as_foreign() -> None:
    class Marked(torch.Tensor):
        pass

    saved = {"w": torch.ones(3)}
    layout, _ = _layout(saved)
    live = {"w": torch.zeros(3).as_subclass(Marked)}
    found = codec.in_place(layout.skeleton, layout, live)
    assert found.foreign and found.indices == ()


def test_the_header_says_whether_a_skeleton_may_hold_a_dtensor() -> None:
    plain, _ = _layout({"w": torch.ones(2)})
    assert not plain.dtensors
    keyed, _ = _layout({"$dtensor": torch.ones(2)})  # a key of that name: conservatively "may"
    assert keyed.dtensors


def test_a_read_with_progress_in_stretches_of_many_small_tensors_counts_every_byte(
        tmp_path: Path, monkeypatch: Any) -> None:
    from distckpt import reading

    saved = {f"t{i}": torch.full((250,), float(i)) for i in range(200)}  # 1,000 bytes each
    saved["big"] = torch.arange(9_000, dtype=torch.float32)  # larger than a stretch: cut
    root, entry = _write(tmp_path, saved)
    monkeypatch.setattr(reading, "_PROGRESS_STEP", 10_000)
    seen: list[int] = []
    live = _zeros_like(saved)
    state = read_component(root, [entry], live, progress=seen.append)
    assert sum(seen) == entry.size_bytes and len(seen) > 20
    assert _same(state, saved) and _same(live, saved)
