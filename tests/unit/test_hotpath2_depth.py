"""The fast depth scan of :mod:`distckpt.boundedjson`: bracket pairs peeled off a level at a time.

Whatever it answers must be exactly the running sum's depth (the scan it shortcuts); where it
cannot prove the depth cheaply (malformed text, a deep chain, many strings holding brackets) it
must give up, not guess.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from distckpt import boundedjson, codec


def _syntax(text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return data.translate(None, boundedjson._NOT_SYNTAX)


def _draw(rng: random.Random, levels: int) -> Any:
    if levels == 0:
        return rng.choice(["x]", "[y", 1, 'q"\\[', None, "\\", '"', '\\"]', "{é}", "]]]", "[[[{", "", "a"])
    if rng.random() < 0.5:
        return [_draw(rng, levels - 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["k", "[", "}", '"', ""]) + str(i): _draw(rng, levels - 1) for i in range(rng.randint(0, 3))}


def test_the_peeled_depth_of_valid_json_is_the_running_sums_whatever_its_strings_hold() -> None:
    rng = random.Random(2)
    settled = 0
    for _ in range(3000):
        text = json.dumps(_draw(rng, rng.randint(0, 9)))
        syntax = _syntax(text)
        peeled = boundedjson._peeled_depth(syntax)
        assert peeled is not None, text  # valid, shallow, few strings with brackets: always settled
        assert peeled == boundedjson._running_depth(syntax), text
        settled += 1
    assert settled == 3000


def test_the_peeled_depth_of_any_bracket_soup_is_exact_or_undecided() -> None:
    rng = random.Random(3)
    alphabet = '[]{}"\\a'
    undecided = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        syntax = _syntax(text)
        peeled = boundedjson._peeled_depth(syntax)
        if peeled is None:
            undecided += 1
        else:
            assert peeled == boundedjson._running_depth(syntax), text
    assert 0 < undecided < 20000  # both branches taken


def test_a_unbalanced_or_deep_or_string_heavy_text_is_left_to_the_running_sum() -> None:
    assert boundedjson._peeled_depth(b"[[]") is None
    assert boundedjson._peeled_depth(b"][") is None
    assert boundedjson._peeled_depth(b"[" * 5000 + b"]" * 5000) is None  # a pass per level: too costly
    many = b"[" + b'["["]' * (boundedjson._SPLIT_LIMIT + 1) + b"]"  # [["["],["["],...] as syntax
    assert boundedjson._peeled_depth(many) is None
    assert boundedjson.nesting_depth(many.decode()) == 2
    assert boundedjson._peeled_depth(b"[" + b'["["]' * 100 + b"]") == 2
    assert boundedjson.nesting_depth("[" * 5000 + "]" * 5000) == 5000


def test_a_hostile_deep_header_is_refused_quickly_and_without_recursion() -> None:
    started = time.perf_counter()
    for text in ("[" * 2_000_000, "[" * 1_000_000 + "]" * 1_000_000, '["]' * 1_000_000):
        try:
            boundedjson.loads(text, 16)
        except ValueError:
            pass
        else:  # pragma: no cover - the assertion below names it
            raise AssertionError("a hostile text was accepted")
    assert time.perf_counter() - started < 60  # a bound against a hang, not a timing


def test_the_depth_of_a_real_header_and_skeleton_is_settled_by_peeling() -> None:
    import torch

    state = {"model": {f"w{i}": torch.zeros(3) for i in range(50)},
             "optim": {"state": {i: {"step": torch.tensor(1.0), "m": torch.zeros(3)} for i in range(50)},
                       "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": list(range(50))}]}}
    header = codec.encode(state).header[8:].decode().rstrip()
    skeleton = json.loads(header)["__metadata__"][codec.SKELETON_KEY]
    for text in (header, skeleton):
        syntax = _syntax(text)
        assert boundedjson._peeled_depth(syntax) == boundedjson._running_depth(syntax)
        assert boundedjson._peeled_depth(syntax) is not None
