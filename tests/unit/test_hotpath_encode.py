"""The encoder's fast walk writes the skeleton text itself: the very bytes the general walk gives.

:func:`distckpt.codec.encode` (without ``copy``) builds the skeleton's JSON text in one
walk (:mod:`distckpt.codec.skeletontext`); ``encode(copy=True)`` still builds the skeleton
as objects and serializes them with ``json.dumps``. The two must agree byte for byte, on
the text and on the tensors' order, for every kind of leaf and container, and refuse the
same too-deep states.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distckpt import SerializationError, codec, hashing
from distckpt.manifest import FileEntry
from distckpt.reading import read_component


def _both(state: Any) -> tuple[codec.EncodedState, codec.EncodedState]:
    return codec.encode(state), codec.encode(state, copy=True)


def _varied() -> dict[Any, Any]:
    shared = torch.arange(6, dtype=torch.float32)
    meta: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2, 2))
    meta._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    return {
        "plain": torch.randn(3, 4),
        "alias": shared,
        "alias_again": shared,
        "view": shared[1:4],
        "strided": torch.arange(10.0)[::2],
        "transposed": torch.arange(6.0).view(2, 3).t(),
        "c128": torch.ones(2, dtype=torch.complex128),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3),
        "param": torch.nn.Parameter(torch.ones(2)),
        7: "int key",
        "ünïcode \"quoted\" \n key": [1, -2, 3.5, -0.0, 1e300, True, False, None, "s"],
        "floats": [math.inf, -math.inf, math.nan, 1.0],
        "tuple": (1, (torch.ones(1), "x"), []),
        "bytes": b"\x00\xffraw",
        "numpy": np.arange(4, dtype=np.int16),
        "npscalar": np.float32(1.5),
        "dtype": torch.bfloat16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "odict": meta,
        "empty_dict": {},
        "empty_list": [],
        "big_int": 2**70,
    }


def test_the_fast_text_equals_the_general_walks_for_every_kind_of_leaf_and_container() -> None:
    fast, general = _both(_varied())
    assert fast.skeleton == general.skeleton
    assert fast.names == general.names and fast.dtypes == general.dtypes and fast.sizes == general.sizes
    assert fast.header == general.header
    assert fast.to_bytes() == general.to_bytes()


def test_a_fast_encoding_decodes_to_the_same_state() -> None:
    state = _varied()
    back = codec.decode(bytearray(codec.encode(state).to_bytes()))
    assert torch.equal(back["view"], state["view"]) and torch.equal(back["transposed"], state["transposed"])
    assert back["alias"].data_ptr() == back["alias_again"].data_ptr()
    assert back["ünïcode \"quoted\" \n key"] == state["ünïcode \"quoted\" \n key"]
    assert back[7] == "int key" and back["big_int"] == 2**70 and back["odict"]._metadata == {"": {"version": 1}}
    assert math.isnan(back["floats"][2]) and back["floats"][:2] == [math.inf, -math.inf]


def _nested_lists(depth: int) -> Any:
    node: Any = torch.ones(1)
    for _ in range(depth):
        node = [node]
    return node


def _nested_dicts(levels: int) -> Any:
    node: Any = torch.ones(1)
    for _ in range(levels):
        node = {"k": node}
    return node


@pytest.mark.parametrize("build, deepest_allowed", [
    (_nested_lists, codec.SKELETON_DEPTH - 1),         # one JSON level per list, one for the tensor leaf
    (_nested_dicts, (codec.SKELETON_DEPTH - 1) // 3),  # three per dict, one for the tensor leaf
])
def test_the_deepest_state_a_skeleton_may_hold_round_trips_and_one_level_more_is_refused(
        tmp_path: Path, build: Any, deepest_allowed: int) -> None:
    fast, general = _both(build(deepest_allowed))
    assert fast.skeleton == general.skeleton
    data = fast.to_bytes()
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f.safetensors").write_bytes(data)
    entry = FileEntry(path="s/f.safetensors", ranks=(0,), writer=0, size_bytes=len(data),
                      checksum=hashing.checksum_of(data))
    live = build(deepest_allowed)
    back = read_component(str(tmp_path), [entry], live)  # read back, in place: every walk takes the depth
    assert codec.encode(back).skeleton == fast.skeleton
    for copy in (False, True):
        with pytest.raises(SerializationError, match="too deeply"):
            codec.encode(build(deepest_allowed + 1), copy=copy)


def test_a_bad_key_is_still_named_by_its_path() -> None:
    with pytest.raises(SerializationError, match=r"outer\.inner: dict key"):
        codec.encode({"outer": {"inner": {(1, 2): torch.ones(1)}}})
