"""The compact header scan: for any header it answers, exactly the metadata and columns the full
JSON parse gives; anything it cannot vouch for (spacing, escapes, a repeated name, a bad dtype,
shape or offset) is left to the full parse, which names the problem."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from distckpt import codec
from distckpt.codec import header as header_module
from distckpt.codec.headerscan import scan_compact
from distckpt.errors import IntegrityError


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(4)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g).half(),
            "c": [torch.tensor(2.0), torch.zeros(2, 0), torch.arange(6, dtype=torch.int64).view(2, 3)],
            "d": {i: torch.randn(7, generator=g) for i in range(20)}, "e": torch.randn(2, 2, dtype=torch.complex128)}


def _full(text: str, start: int, limit: int) -> Any:
    """What the full parse gives: metadata and columns, or the error it raises."""
    try:
        raw = json.loads(text)
        meta = raw.pop("__metadata__", None) or {}
        return meta, header_module._checked_columns(raw, start, limit)
    except IntegrityError as exc:
        return f"IntegrityError: {exc}"
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return type(exc).__name__


def _header(state: Any) -> tuple[str, int, int]:
    data = codec.encode(state).to_bytes()
    start = codec.header_length(data[:8], len(data))
    return data[8:start].decode(), start, len(data) - start


def test_a_distckpt_header_is_scanned_into_the_full_parses_columns() -> None:
    for state in (_state(), {}, {"x": torch.zeros(0)}, {"only": torch.tensor(1, dtype=torch.int8)}):
        text, start, limit = _header(state)
        scanned = scan_compact(text, start, limit)
        assert scanned is not None
        assert scanned == _full(text, start, limit)
    parts = codec.encode(_state()).split(3)
    for part in parts:  # balanced-write parts: offsets from 0 in each, a part label
        text = part.header[8:].decode()
        scanned = scan_compact(text, len(part.header), part.total_size - len(part.header))
        assert scanned is not None and scanned[0][codec.PART_KEY]


def test_a_plain_safetensors_header_with_spaces_or_another_order_is_left_to_the_full_parse() -> None:
    text, start, limit = _header(_state())
    raw = json.loads(text)
    for other in (json.dumps(raw), json.dumps(raw, separators=(",", ":"), sort_keys=True)):
        assert scan_compact(other, start, limit) is None or scan_compact(other, start, limit) == _full(other, start, limit)
    assert scan_compact(json.dumps(raw), start, limit) is None  # spaces after separators


_EDITS = [
    ('"dtype":"F32"', '"dtype":"F99"'), ('"dtype":"F32"', '"dtype":"F16"'), ('"shape":[7]', '"shape":[8]'),
    ('"shape":[7]', '"shape":[07]'), ('"shape":[7]', '"shape":[7,]'), ('"shape":[7]', '"shape":[-7]'),
    ('"shape":[7]', '"shape":[9223372036854775808]'), ('"shape":[7]', '"shape":[7.0]'),
    ('"shape":[7]', '"shape":[true]'), ('"data_offsets":[', '"data_offsets":[1'),
    (']}', ']} '), ('"t1"', '"t2"'), ('"t1"', '"__metadata__"'), ('"t1"', '"t\\u0031"'), ('"t1"', '"t\\u00e9"'),
    (',"t2":', ', "t2":'), ('"format":"pt"', '"format":1'), ('"format":"pt"', '"format":"p\\"t"'),
    ('{"__metadata__":{', '{"__metadata__":{"format":"x",'), ('{"__metadata__":{', ' {"__metadata__":{'),
    ('"data_offsets":[0,', '"data_offsets":[00,'), ('}}', '},"zz":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'),
]


@pytest.mark.parametrize(("old", "new"), _EDITS)
def test_an_edited_header_gives_what_the_full_parse_gives_or_is_left_to_it(old: str, new: str) -> None:
    text, start, limit = _header(_state())
    for count in (1, -1):
        edited = text.replace(old, new, count)
        if edited == text:
            continue
        scanned = scan_compact(edited, start, limit)
        if scanned is not None:
            assert scanned == _full(edited, start, limit), edited[:300]


def test_random_byte_edits_never_make_the_scan_disagree_with_the_full_parse() -> None:
    text, start, limit = _header({f"w{i}": torch.zeros(i % 4 + 1) for i in range(30)})
    rng = random.Random(12)
    alphabet = '0123456789,[]{}":\\ tFUI_a'
    answered = 0
    for _ in range(4000):
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        edited = "".join(chars)
        scanned = scan_compact(edited, start, limit)
        if scanned is not None:
            answered += 1
            assert scanned == _full(edited, start, limit), edited
    assert answered > 0


def test_offsets_past_the_file_or_not_matching_the_shape_are_refused_naming_the_file() -> None:
    data = bytearray(codec.encode(_state()).to_bytes())
    start = codec.header_length(data[:8], len(data))
    for old, new in (('"data_offsets":[0,', '"data_offsets":[4,'), ('"shape":[7]', '"shape":[9]')):
        edited = bytearray(data)
        text = edited[8:start].decode().replace(old, new, 1)
        edited[8:start] = text.encode()
        with pytest.raises(IntegrityError, match=r"^f\.safetensors: tensor bounds"):
            codec.parse_header(memoryview(edited)[:start], len(edited), "f.safetensors")
    text = data[8:start].decode()
    assert scan_compact(text, start, len(data) - start - 1) is None  # the last tensor's end is past the data
