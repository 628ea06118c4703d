"""The header's columns checked a column at a time: the same columns as the entry-by-entry
check for a good header, and for a bad one the same error naming the same first bad entry."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
import torch

from distckpt import codec
from distckpt.codec import header as header_module
from distckpt.errors import IntegrityError


def _raw(state: Any) -> tuple[dict[str, Any], int, int]:
    data = codec.encode(state).to_bytes()
    start = codec.header_length(data[:8], len(data))
    raw = json.loads(data[8:start])
    raw.pop("__metadata__")
    return raw, start, len(data) - start


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).half(),
            "c": [torch.tensor(2.0), torch.zeros(2, 0), torch.arange(6, dtype=torch.int64).view(2, 3)],
            "d": {i: torch.randn(7, generator=g) for i in range(20)}}


def _outcome(check: Any, raw: dict[str, Any], start: int, limit: int) -> Any:
    try:
        return check(raw, start, limit)
    except IntegrityError as exc:
        return f"IntegrityError: {exc}"
    except (KeyError, TypeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_good_header_is_checked_at_once_into_the_entry_by_entry_columns() -> None:
    raw, start, limit = _raw(_state())
    fast = header_module._columns_at_once(raw, start, limit)
    assert fast is not None
    assert fast == header_module._columns_by_entry(raw, start, limit)
    assert header_module._columns_at_once({}, start, limit) == ([], [], [], [], [])


_BAD_VALUES = [None, True, False, -1, 2**63, 2**64, 1.0, "3", [], [1], [1, 2, 3], {}, [[1]], "F32", "X9", 12, 13]


def _mutate(rng: random.Random, raw: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(list(raw))
        info = raw[name]
        if type(info) is not dict or not all(k in info for k in ("dtype", "shape", "data_offsets")) \
                or type(info["shape"]) is not list or type(info["data_offsets"]) is not list:
            continue  # already broken by the first mutation
        what = rng.choice(["dtype", "shape", "shape-entry", "data_offsets", "begin", "end", "entry", "drop",
                           "shift"])
        if what == "entry":
            raw[name] = rng.choice([None, [], "x", 3])
        elif what == "drop":
            info.pop(rng.choice(["dtype", "shape", "data_offsets"]))
        elif what == "shape-entry" and info["shape"]:
            info["shape"][rng.randrange(len(info["shape"]))] = rng.choice(_BAD_VALUES)
        elif what == "begin":
            info["data_offsets"][0] = rng.choice(_BAD_VALUES + [info["data_offsets"][0] + 4])
        elif what == "end":
            info["data_offsets"][1] = rng.choice(_BAD_VALUES + [info["data_offsets"][1] + 4, 10**9])
        elif what == "shift":  # a consistent size, moved past the end of the file
            info["data_offsets"] = [x + 10**6 if type(x) is int else x for x in info["data_offsets"]]
        else:
            info[what if what != "shape-entry" else "shape"] = rng.choice(_BAD_VALUES)
    return raw


def test_a_bad_header_gives_the_entry_by_entry_error_whichever_check_finds_it() -> None:
    raw, start, limit = _raw(_state())
    rng = random.Random(9)
    refused = 0
    for _ in range(1500):
        bad = _mutate(rng, raw)
        slow = _outcome(header_module._columns_by_entry, bad, start, limit)
        assert _outcome(header_module._checked_columns, bad, start, limit) == slow
        fast = _outcome(header_module._columns_at_once, bad, start, limit)
        if isinstance(slow, str):
            refused += 1
            assert fast is None or isinstance(fast, str)  # never accepts what the entry loop refuses
        elif fast is not None and not isinstance(fast, str):
            assert fast == slow
    assert refused > 1000


def test_a_header_whose_sizes_do_not_fit_is_refused_by_parse_header_naming_the_file() -> None:
    data = bytearray(codec.encode(_state()).to_bytes())
    start = codec.header_length(data[:8], len(data))
    text = data[8:start].decode().replace('"data_offsets":[0,', '"data_offsets":[4,', 1)
    data[8:start] = text.encode()
    with pytest.raises(IntegrityError, match=r"^f\.safetensors: tensor bounds"):
        codec.parse_header(memoryview(data)[:start], len(data), "f.safetensors")
