"""Loading in place: tensors are read straight into the live state where they match."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import CheckpointCoordinator, IntegrityError, StateComponent, codec, storage
from distckpt.manifest import FileEntry
from distckpt.reading import read_component


class Recorder:
    """A Stateful that keeps its state and remembers what load_state_dict received."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.received: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.received = state
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and isinstance(self.state.get(k), torch.Tensor) \
                    and self.state[k].shape == v.shape:
                self.state[k].copy_(v)
            else:
                self.state[k] = v


def _save(tmp_path: Path, state: dict[str, Any]) -> str:
    return CheckpointCoordinator([StateComponent("s", Recorder(state), "global")],
                                 output_dir=tmp_path).save_checkpoint()


def _file(path: str, tmp_path: Path) -> tuple[FileEntry, str]:
    from distckpt import CheckpointManifest

    entry = CheckpointManifest.load(path).components["s"].files[0]
    return entry, path


def test_load_reads_matching_tensors_into_the_live_memory(tmp_path: Path) -> None:
    saved = {"w": torch.randn(64, 32), "b": torch.arange(7, dtype=torch.int64), "step": 3}
    _save(tmp_path, saved)
    live = {"w": torch.zeros(64, 32), "b": torch.zeros(7, dtype=torch.int64), "step": 0}
    pointers = {k: live[k].data_ptr() for k in ("w", "b")}
    target = Recorder(live)
    CheckpointCoordinator([StateComponent("s", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert target.received is not None
    assert {k: target.received[k].data_ptr() for k in ("w", "b")} == pointers
    assert torch.equal(live["w"], saved["w"]) and torch.equal(live["b"], saved["b"]) and live["step"] == 3


def test_load_in_place_false_decodes_into_fresh_memory(tmp_path: Path) -> None:
    saved = {"w": torch.randn(16)}
    _save(tmp_path, saved)
    live = {"w": torch.zeros(16)}
    target = Recorder(live)
    CheckpointCoordinator([StateComponent("s", target, "global")], output_dir=tmp_path,
                          load_in_place=False).load_checkpoint()
    assert target.received is not None and target.received["w"].data_ptr() != live["w"].data_ptr()
    assert torch.equal(live["w"], saved["w"])


@pytest.mark.parametrize("live_w", [torch.zeros(8, 2), torch.zeros(16, dtype=torch.float64),
                                    torch.zeros(32)[::2], torch.zeros(0)], ids=["shape", "dtype", "strided", "empty"])
def test_tensors_that_do_not_match_are_decoded_into_fresh_memory(tmp_path: Path, live_w: torch.Tensor) -> None:
    saved = {"w": torch.randn(16), "other": torch.randn(3)}
    _save(tmp_path, saved)
    before = live_w.clone()
    target = Recorder({"w": live_w, "other": torch.zeros(3)})
    CheckpointCoordinator([StateComponent("s", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert target.received is not None
    assert torch.equal(target.received["w"], saved["w"]) and torch.equal(target.received["other"], saved["other"])
    assert torch.equal(live_w, before) or live_w.shape == saved["w"].shape  # never written in place


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float8_e4m3fn, torch.bfloat16, torch.bool])
def test_dtypes_stored_raw_or_natively_are_read_in_place_bit_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    source = torch.randn(5, 3, dtype=torch.complex128) if dtype.is_complex else torch.randn(5, 3) * 4
    saved = {"x": source.to(dtype)}
    _save(tmp_path, saved)
    live = {"x": torch.zeros(5, 3, dtype=dtype)}
    CheckpointCoordinator([StateComponent("s", Recorder(live), "global")], output_dir=tmp_path).load_checkpoint()
    assert codec.tensor_bytes(live["x"]).tobytes() == codec.tensor_bytes(saved["x"]).tobytes()


def test_tied_tensors_are_read_once_and_stay_tied(tmp_path: Path) -> None:
    shared = torch.randn(10)
    _save(tmp_path, {"a": shared, "b": shared})
    tied = torch.zeros(10)
    target = Recorder({"a": tied, "b": tied})
    CheckpointCoordinator([StateComponent("s", target, "global")], output_dir=tmp_path).load_checkpoint()
    assert target.received is not None and target.received["a"] is target.received["b"]
    assert torch.equal(tied, shared)


def test_modules_and_optimizers_load_in_place_bit_exact(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(4, 6)).sum().backward()
        opt.step()
    comps = [StateComponent("model", model, "global"), StateComponent("opt", opt, "global")]
    CheckpointCoordinator(comps, output_dir=tmp_path).save_checkpoint()
    model2 = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2(torch.randn(4, 6)).sum().backward()
    opt2.step()  # creates the moments, so the optimizer state is read in place too
    weight = model2[0].weight.data_ptr()
    moment = opt2.state[model2[0].weight]["exp_avg"].data_ptr()
    CheckpointCoordinator([StateComponent("model", model2, "global"), StateComponent("opt", opt2, "global")],
                          output_dir=tmp_path).load_checkpoint()
    assert model2[0].weight.data_ptr() == weight
    assert opt2.state[model2[0].weight]["exp_avg"].data_ptr() == moment
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg_sq"], opt2.state_dict()["state"][0]["exp_avg_sq"])
    assert opt2.param_groups[0]["lr"] == 0.01


def test_a_flipped_byte_in_the_data_is_a_checksum_error_naming_the_file(tmp_path: Path) -> None:
    n = codec.PACK_BELOW // 4  # large enough to be read straight into the live tensor
    path = _save(tmp_path, {"w": torch.randn(n)})
    entry, _ = _file(path, tmp_path)
    full = Path(path) / entry.path
    data = bytearray(full.read_bytes())
    data[-10] ^= 0x40
    full.write_bytes(bytes(data))
    live = {"w": torch.zeros(n)}
    with pytest.raises(IntegrityError, match=r"global\.safetensors: checksum mismatch.*now hold partial data"):
        read_component(path, [entry], live)
    with pytest.raises(IntegrityError, match=r"checksum mismatch \(file is corrupt or was modified\)$"):
        read_component(path, [entry], None)  # nothing read in place: nothing to warn about


def test_a_damaged_header_is_reported_as_a_checksum_error_not_a_parse_error(tmp_path: Path) -> None:
    path = _save(tmp_path, {"w": torch.randn(10)})
    entry, _ = _file(path, tmp_path)
    full = Path(path) / entry.path
    data = bytearray(full.read_bytes())
    data[20] = ord("{")
    full.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        read_component(path, [entry], {"w": torch.zeros(10)})


def test_a_part_file_listed_as_a_whole_file_is_refused(tmp_path: Path) -> None:
    enc = codec.encode({"a": torch.randn(100), "b": torch.randn(100)}).split(2)[1]
    (tmp_path / "s").mkdir()
    size, checksum = storage.write_file(str(tmp_path / "s" / "f.safetensors"), enc.chunks())
    entry = FileEntry(path="s/f.safetensors", ranks=(0,), writer=0, size_bytes=size, checksum=checksum)
    with pytest.raises(IntegrityError, match="part label '1/2'"):
        read_component(str(tmp_path), [entry])


def test_the_verified_reader_places_bytes_in_order_and_checks_the_checksum(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40
    size, checksum = storage.write_file(str(tmp_path / "f"), [memoryview(payload)])
    a, b = bytearray(100), bytearray(3000)
    with storage.VerifiedReader(str(tmp_path / "f"), size, checksum) as reader:
        reader.read_to(50)
        reader.read_into([memoryview(a), memoryview(b)])
        rest = reader.finish()
    assert bytes(a) == payload[50:150] and bytes(b) == payload[150:3150]
    assert bytes(rest[:50]) == payload[:50] and bytes(rest[3150:]) == payload[3150:]
    with storage.VerifiedReader(str(tmp_path / "f"), size, checksum.replace(checksum[-4:], "0000")) as reader, \
            pytest.raises(IntegrityError, match="checksum mismatch"):
        reader.finish()


def test_many_small_tensors_of_mixed_dtypes_load_in_place_bit_exact(tmp_path: Path) -> None:
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
              torch.uint8, torch.bool, torch.complex64, torch.uint16, torch.float8_e4m3fn]
    shapes = [(), (1,), (5,), (3, 4), (2, 1, 3), (0,)]
    gen = torch.Generator().manual_seed(0)
    saved: dict[str, Any] = {}
    for i in range(600):
        dtype, shape = dtypes[i % len(dtypes)], shapes[i % len(shapes)]
        raw = torch.randint(0, 256, (max(1, math.prod(shape)) * torch.empty(0, dtype=dtype).element_size(),),
                            dtype=torch.uint8, generator=gen)
        saved[f"t{i}"] = raw.view(dtype)[: math.prod(shape)].reshape(shape).clone()
    saved["big"] = torch.randn(codec.PACK_BELOW // 4 + 3, generator=gen)
    path = _save(tmp_path, saved)
    entry, _ = _file(path, tmp_path)
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    pointers = {k: v.data_ptr() for k, v in live.items() if v.numel()}
    out = read_component(path, [entry], live)
    for k, v in saved.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        assert bytes(codec.tensor_bytes(out[k])) == bytes(codec.tensor_bytes(v)), k
        if k in pointers:
            assert out[k].data_ptr() == pointers[k], k  # the live tensor itself, now holding the data
            assert bytes(codec.tensor_bytes(live[k])) == bytes(codec.tensor_bytes(v)), k
