"""A load parses each file's header once: the read phase takes the state check's parse when the bytes agree.

The state check (for ``nn.Module`` and optimizer components) parses the headers before the
read phase; :mod:`distckpt.reading` keeps those layouts and the read phase uses one only when
the header bytes it has just read are the very same, so a file that changed in between is
parsed again, and a damaged file still names itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from distckpt import CheckpointCoordinator, IntegrityError, StateComponent, codec, hashing, reading
from distckpt.manifest import FileEntry


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = codec.parse_header

    def parse(header: Any, size: int, where: str = "<buffer>") -> codec.FileLayout:
        calls.append(where)
        return real(header, size, where)

    monkeypatch.setattr(codec, "parse_header", parse)
    return calls


def test_a_module_load_parses_each_header_once_and_restores_the_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _model()
    CheckpointCoordinator([StateComponent("model", saved, "global")], output_dir=tmp_path).save_checkpoint()
    live = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = _counting(monkeypatch)
    CheckpointCoordinator([StateComponent("model", live, "global")], output_dir=tmp_path).load_checkpoint()
    assert len(calls) == 1 and len(set(calls)) == 1
    for a, b in zip(saved.state_dict().values(), live.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not reading._PARSED  # taken, not kept


def _file(tmp_path: Path, state: Any, name: str = "f.safetensors") -> tuple[str, FileEntry]:
    data = codec.encode(state).to_bytes()
    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / name).write_bytes(data)
    return str(tmp_path), FileEntry(path=f"s/{name}", ranks=(0,), writer=0, size_bytes=len(data),
                                    checksum=hashing.checksum_of(data))


def test_a_header_that_changed_since_the_state_check_is_parsed_again(tmp_path: Path) -> None:
    root, entry = _file(tmp_path, {"w": torch.arange(4.0)})
    assert reading.read_layouts(root, [entry]) is not None
    full = str(tmp_path / "s" / "f.safetensors")
    other = codec.encode({"w": torch.arange(4.0), "x": torch.ones(1)})
    # what the state check saw: another header (as if the file had been replaced in between)
    layout = codec.parse_header(other.header, other.total_size)
    reading._PARSED[full] = (other.header, entry.size_bytes, layout)
    state = reading.read_component(root, [entry], {"w": torch.zeros(4)})
    assert set(state) == {"w"} and torch.equal(state["w"], torch.arange(4.0))


def test_a_damaged_file_still_names_itself_after_the_state_check_parsed_it(tmp_path: Path) -> None:
    root, entry = _file(tmp_path, {"w": torch.arange(64.0)})
    path = tmp_path / "s" / "f.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte: the header still parses
    path.write_bytes(bytes(data))
    assert reading.read_layouts(root, [entry]) is not None
    with pytest.raises(IntegrityError, match=r"f\.safetensors: checksum mismatch"):
        reading.read_component(root, [entry], {"w": torch.zeros(64)})
