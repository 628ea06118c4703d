"""The depth-bounded JSON loader: exact depth outside strings, refusal beyond the limit."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from distckpt import boundedjson


def _depth(obj: Any) -> int:
    if isinstance(obj, list):
        return 1 + max((_depth(v) for v in obj), default=0)
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    return 0


def _draw(rng: random.Random, levels: int) -> Any:
    if levels == 0:
        return rng.choice(["x]", "[y", 1, 'q"\\[', None, "\\", '"', '\\"]', "{é}"])
    if rng.random() < 0.5:
        return [_draw(rng, levels - 1) for _ in range(rng.randint(0, 3))]
    return {f'{i}{{"\\': _draw(rng, levels - 1) for i in range(rng.randint(0, 3))}


@pytest.mark.parametrize("block", [7, 1 << 20], ids=["tiny-blocks", "default-blocks"])
def test_the_depth_scan_matches_the_parsed_depth_whatever_the_strings_hold(
        block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(boundedjson, "_BLOCK", block)
    rng = random.Random(11)
    for _ in range(2000):
        obj = _draw(rng, rng.randint(0, 7))
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
        assert boundedjson.nesting_depth(text) == _depth(obj), text
        assert boundedjson.nesting_depth(text.encode()) == _depth(obj), text


def test_json_nested_deeper_than_the_limit_is_a_value_error_not_a_recursion_error() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested 100000 levels deep"):
        boundedjson.loads(deep, 512)
    assert boundedjson.loads("[[1]]", 2) == [[1]]
    with pytest.raises(ValueError, match="at most 1"):
        boundedjson.loads("[[1]]", 1)
