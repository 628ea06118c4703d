"""The state check (issue 14): a saved state that does not fit the live state dict is named
before any byte is read into live tensors."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from distckpt import codec
from distckpt.manifest import FileEntry
from distckpt.reading import read_layouts
from distckpt.statecheck import MAX_PROBLEMS, check_state, describe_problems
from distckpt.storage import write_file


def layouts_of(state: Any, parts: int = 1) -> list[codec.FileLayout]:
    encoded = codec.encode(state)
    pieces = encoded.split(parts) if parts > 1 else (encoded,)
    return [codec.parse_header(p.to_bytes(), p.total_size) for p in pieces]


def test_an_identical_state_fits() -> None:
    model = nn.Linear(4, 3)
    assert check_state("model", layouts_of(model.state_dict()), model.state_dict()) == []


def test_a_saved_shape_that_differs_from_the_live_tensor_is_named_with_both_shapes() -> None:
    saved = nn.Linear(8, 4).state_dict()
    live = nn.Linear(8, 6).state_dict()
    problems = check_state("model", layouts_of(saved), live)
    assert problems == [
        "component 'model', entry 'weight': saved shape [4, 8] (float32), live shape [6, 8] (float32)",
        "component 'model', entry 'bias': saved shape [4] (float32), live shape [6] (float32)",
    ]


def test_a_shape_mismatch_is_reported_even_when_not_strict() -> None:
    problems = check_state("m", layouts_of({"w": torch.zeros(2, 2)}), {"w": torch.zeros(3)}, strict=False)
    assert len(problems) == 1 and "saved shape [2, 2]" in problems[0] and "live shape [3]" in problems[0]


def test_a_saved_dtype_that_differs_is_refused_when_strict_and_left_to_load_state_dict_otherwise() -> None:
    layouts = layouts_of({"w": torch.zeros(2, dtype=torch.float32)})
    live = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    assert check_state("m", layouts, live) == [
        "component 'm', entry 'w': saved dtype float32, live dtype bfloat16 (shape [2])"]
    assert check_state("m", layouts, live, strict=False) == []


def test_a_dtype_safetensors_lacks_is_compared_by_the_skeletons_record() -> None:
    layouts = layouts_of({"z": torch.zeros(3, dtype=torch.complex128)})
    assert check_state("m", layouts, {"z": torch.zeros(3, dtype=torch.complex128)}) == []
    assert check_state("m", layouts, {"z": torch.zeros(4, dtype=torch.complex128)}) == [
        "component 'm', entry 'z': saved shape [3] (complex128), live shape [4] (complex128)"]


def test_tensor_keys_on_one_side_only_are_named_both_ways() -> None:
    saved = {"layer": {"weight": torch.zeros(1), "old": torch.zeros(1)}}
    live = {"layer": {"weight": torch.zeros(1), "new": torch.zeros(1)}}
    assert check_state("m", layouts_of(saved), live) == [
        "component 'm', entries under 'layer': live state has [new] that the checkpoint lacks "
        "and checkpoint has [old] that the live state lacks"]
    assert check_state("m", layouts_of(saved), live, strict=False) == []


def test_a_fresh_optimizer_with_empty_state_accepts_a_trained_ones_checkpoint() -> None:
    model = nn.Linear(3, 2)
    trained = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    trained.step()
    fresh = torch.optim.AdamW(nn.Linear(3, 2).parameters())
    assert check_state("optimizer", layouts_of(trained.state_dict()), fresh.state_dict()) == []


def test_non_tensor_leaves_and_lists_of_another_length_are_left_to_the_stateful() -> None:
    saved = {"step": 3, "names": ["a", "b"], "w": torch.zeros(2)}
    live = {"step": "x", "names": ["a"], "w": torch.zeros(2)}
    assert check_state("m", layouts_of(saved), live) == []


def test_the_parts_of_a_balanced_write_are_checked_together() -> None:
    saved = {f"t{i}": torch.zeros(64) for i in range(8)}
    layouts = layouts_of(saved, parts=2)
    assert len(layouts) == 2 and all(layout.entries for layout in layouts)
    live = dict(saved, t7=torch.zeros(65))
    assert check_state("m", layouts, live) == [
        "component 'm', entry 't7': saved shape [64] (float32), live shape [65] (float32)"]


def test_many_problems_are_listed_up_to_a_limit_then_counted() -> None:
    saved = {f"w{i}": torch.zeros(1) for i in range(MAX_PROBLEMS + 3)}
    live = {k: torch.zeros(2) for k in saved}
    text = describe_problems(check_state("m", layouts_of(saved), live))
    assert text.count("saved shape") == MAX_PROBLEMS and text.endswith("... and 3 more")


def _write(tmp_path: Any, name: str, state: Any) -> FileEntry:
    encoded = codec.encode(state)
    os.makedirs(tmp_path / "m", exist_ok=True)
    size, checksum = write_file(str(tmp_path / "m" / name), encoded.chunks())
    return FileEntry(path=f"m/{name}", ranks=(0,), writer=0, size_bytes=size, checksum=checksum)


def test_read_layouts_reads_the_headers_a_check_needs(tmp_path: Any) -> None:
    entry = _write(tmp_path, "rank-0.safetensors", {"w": torch.zeros(5)})
    layouts = read_layouts(str(tmp_path), [entry])
    assert layouts is not None
    assert check_state("m", layouts, {"w": torch.zeros(6)}) != []


def test_read_layouts_leaves_a_damaged_or_missing_header_to_the_read_phase(tmp_path: Any) -> None:
    entry = _write(tmp_path, "rank-0.safetensors", {"w": torch.zeros(5)})
    with open(tmp_path / entry.path, "r+b") as f:
        f.write(b"\xff" * 8)
    assert read_layouts(str(tmp_path), [entry]) is None
    os.remove(tmp_path / entry.path)
    assert read_layouts(str(tmp_path), [entry]) is None


def test_a_read_with_progress_counts_every_byte_of_every_file_and_decodes_the_same(tmp_path: Any) -> None:
    from distckpt import reading

    state = {"big": torch.arange(300_000, dtype=torch.float32), "small": torch.ones(3), "n": 5}
    entry = _write(tmp_path, "rank-0.safetensors", state)
    seen: list[int] = []
    old = reading._PROGRESS_STEP
    reading._PROGRESS_STEP = 100_000  # several stretches for a 1.2 MB file
    try:
        live = {"big": torch.zeros(300_000), "small": torch.zeros(3), "n": 0}
        out = reading.read_component(str(tmp_path), [entry], live, progress=seen.append)
    finally:
        reading._PROGRESS_STEP = old
    assert sum(seen) == entry.size_bytes and len(seen) > 3
    assert torch.equal(out["big"], state["big"]) and out["big"] is live["big"] and out["n"] == 5
