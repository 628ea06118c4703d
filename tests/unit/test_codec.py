from __future__ import annotations

import math
import struct
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch

from distckpt import IntegrityError, SerializationError
from distckpt.codec import decode, encode

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2]


def roundtrip(state: Any) -> Any:
    return decode(bytearray(encode(state).to_bytes()))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3)], ids=str)
def test_every_dtype_and_shape_round_trips_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    raw = torch.randint(0, 256, (max(1, math.prod(shape)) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8)
    t = raw.view(dtype)[: math.prod(shape)].reshape(shape)
    assert same_bits(roundtrip({"t": t})["t"], t)


def test_non_contiguous_and_conjugated_views_round_trip() -> None:
    a = torch.arange(12.0).reshape(3, 4)
    c = torch.randn(3, dtype=torch.complex64).conj()
    out = roundtrip({"t": a.t(), "s": a[:, ::2], "c": c})
    assert torch.equal(out["t"], a.t()) and torch.equal(out["s"], a[:, ::2])
    assert torch.equal(out["c"], c.resolve_conj())


def test_views_of_the_same_bytes_that_differ_only_in_a_conjugate_or_negative_bit_are_not_aliased() -> None:
    base = torch.randn(6, dtype=torch.complex64)
    strided = base[::2]
    state = {"imag": base.imag, "neg_imag": base.conj().imag, "s": strided, "s_conj": strided.conj()}
    out = roundtrip(state)
    for key, t in state.items():
        assert torch.equal(out[key], t.resolve_conj().resolve_neg()), key
    for copy in (False, True):  # with and without the encoder's private copy
        assert len(encode({"a": base.imag, "b": base.conj().imag}, copy=copy).tensors) == 2
        assert len(encode({"a": base.imag, "b": base.imag}, copy=copy).tensors) == 1  # a true alias, once


def test_aliased_tensors_are_written_once_and_come_back_aliased() -> None:
    a = torch.randn(1000)
    enc = encode({"x": a, "y": a, "nested": [a]})
    assert len(enc.tensors) == 1
    out = decode(bytearray(enc.to_bytes()))
    assert out["x"] is out["y"] is out["nested"][0]


def test_python_values_keep_their_types() -> None:
    state = {1: "int key", "s": [None, True, False, 0, -7, 2**70, 1.5, -0.0, float("inf"), float("-inf")],
             "t": (1, (2, 3)), "b": b"\x00\xff", "dt": torch.bfloat16, "size": torch.Size([2, 3]),
             "dev": torch.device("cpu"), "np": np.arange(6, dtype=np.int16).reshape(2, 3),
             "npf": np.float32(1.25), "npb": np.bool_(True), "ns": np.str_("hi")}
    out = roundtrip(state)
    assert out[1] == "int key" and out["t"] == (1, (2, 3)) and out["b"] == b"\x00\xff"
    assert [type(v) for v in out["s"]] == [type(v) for v in state["s"]]
    assert out["s"] == state["s"] and math.copysign(1, out["s"][7]) == -1
    assert out["dt"] is torch.bfloat16 and out["size"] == torch.Size([2, 3]) and out["dev"] == torch.device("cpu")
    assert out["np"].dtype == np.int16 and (out["np"] == state["np"]).all()
    assert type(out["npf"]) is np.float32 and out["npf"] == np.float32(1.25)
    assert type(out["npb"]) is np.bool_ and type(out["ns"]) is np.str_
    nan = roundtrip([float("nan")])[0]
    assert math.isnan(nan)


def test_module_state_dicts_keep_ordered_dict_and_version_metadata() -> None:
    sd = torch.nn.BatchNorm1d(3).state_dict()
    out = roundtrip(sd)
    assert type(out) is OrderedDict and list(out) == list(sd)
    assert out._metadata == sd._metadata  # type: ignore[attr-defined]


def test_numpy_rng_state_round_trips() -> None:
    state = np.random.RandomState(3).get_state()
    out = roundtrip(state)
    assert out[0] == state[0] and (out[1] == state[1]).all() and out[2:] == state[2:]


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"optimizer": {"state": {3: {"foo": object()}}}}, "optimizer.state.3.foo"),
        ({"a": [1, {2, 3}]}, "a.1"),
        ({(1, 2): 3}, "tuple"),
        ({"o": np.array([object()])}, "o"),
    ],
)
def test_unsupported_objects_name_their_path(state: Any, path: str) -> None:
    with pytest.raises(SerializationError, match=path.replace(".", r"\.")):
        encode(state)


def test_files_are_valid_safetensors_readable_by_the_reference_library() -> None:
    state = {"w": torch.randn(3, 4), "b": torch.randn(4).bfloat16(), "step": 3}
    loaded = safetensors.torch.load(encode(state).to_bytes())
    assert sorted(t.shape for t in loaded.values()) == sorted([torch.Size([3, 4]), torch.Size([4])])


def test_plain_safetensors_files_decode_to_their_tensors() -> None:
    data = safetensors.torch.save({"w": torch.arange(4.0)})
    out = decode(bytearray(data))
    assert torch.equal(out["w"], torch.arange(4.0))


def test_tensors_start_aligned_to_their_element_size() -> None:
    enc = encode({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(5, dtype=torch.float64),
                  "c": torch.ones(1, dtype=torch.int16)})
    assert len(enc.header) % 8 == 0
    assert [t.element_size() for t in enc.tensors] == [8, 2, 1]


@pytest.mark.parametrize("cut", [0, 4, 9, 40])
def test_truncated_bytes_raise_integrity_error(cut: int) -> None:
    data = encode({"w": torch.randn(10)}).to_bytes()
    with pytest.raises(IntegrityError, match="here"):
        decode(bytearray(data[:cut]), where="here")


@pytest.mark.parametrize("dtype", [torch.complex128, torch.float32], ids=str)
def test_aliases_of_every_dtype_keep_their_dtype_and_shape(dtype: torch.dtype) -> None:
    t = torch.randn(2, 3, dtype=dtype)
    out = roundtrip({"a": t, "b": t})
    assert out["a"] is out["b"]
    assert same_bits(out["b"], t)


def test_non_finite_python_floats_keep_every_bit() -> None:
    import struct

    for value in (float("inf"), float("-inf"), float("nan"), -float("nan"),
                  struct.unpack(">d", bytes.fromhex("7ff0000000000123"))[0]):
        back = roundtrip({"x": value})["x"]
        assert struct.pack(">d", back) == struct.pack(">d", value)


def test_loaded_tensors_are_aligned_to_their_element_size_even_in_a_misaligned_buffer() -> None:
    state = {"b": torch.ones(3, dtype=torch.bool), "c": torch.randn(2, dtype=torch.complex128),
             "d": torch.randn(3, dtype=torch.float64)}
    data = encode(state).to_bytes()
    assert (8 + struct.unpack("<Q", data[:8])[0]) % 16 == 0
    backing = torch.empty(len(data) + 1, dtype=torch.uint8).numpy()
    view = memoryview(backing).cast("B")[1:]  # deliberately off by one byte
    view[:] = data
    out = decode(view)
    for key, t in out.items():
        assert t.data_ptr() % min(t.element_size(), 16) == 0, key
        assert torch.equal(t, state[key])
    torch.nn.Parameter(torch.zeros(2, dtype=torch.complex128)).data.copy_(out["c"])
