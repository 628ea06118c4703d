"""Bounded JSON: parse text from a checkpoint only when its nesting depth is sane.

Pure module. ``json.loads`` recurses once per nesting level, so a hostile
manifest, safetensors header or skeleton nested 100,000 deep raises
``RecursionError`` (or worse, on a small thread stack). :func:`loads` first
measures the depth with a vectorised scan (escapes and strings removed, then
a running sum over the brackets, in blocks) and refuses a
document deeper than its limit with a ``ValueError``, which the callers turn
into :class:`~distckpt.errors.ManifestError` or
:class:`~distckpt.errors.IntegrityError` naming the file.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

__all__ = ["loads", "nesting_depth"]

_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # a backslash and the byte it escapes
_STRING = re.compile(rb'"[^"]*"')  # a string once escapes are gone and only quotes and brackets are left
_NOT_SYNTAX = bytes(b for b in range(256) if b not in b'"[]{}')
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_BLOCK = 1 << 20


def nesting_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (0 for a scalar).

    Brackets inside strings do not count. For malformed text (an unterminated
    string, unbalanced brackets) the result is an upper bound of what a parser
    would reach before failing. Linear time, memory a few MiB at most.
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\" in data:
        data = _ESCAPE.sub(b"", data)
    brackets = _STRING.sub(b"", data.translate(None, _NOT_SYNTAX))  # a stray quote counts 0 below
    deepest = level = 0
    for start in range(0, len(brackets), _BLOCK):
        steps = _STEP[np.frombuffer(brackets, dtype=np.uint8, count=min(_BLOCK, len(brackets) - start),
                                    offset=start)]
        running = np.cumsum(steps, dtype=np.int64) + level
        deepest = max(deepest, int(running.max()))
        level = int(running[-1])
    return deepest


def loads(text: str | bytes, max_depth: int, **kwargs: Any) -> Any:
    """``json.loads(text, **kwargs)`` after checking the nesting depth is at most ``max_depth``.

    Called by the manifest parser and the codec (not collective). Raises
    ``json.JSONDecodeError`` for malformed JSON and ``ValueError`` for a
    document nested deeper than ``max_depth`` (also when the parser still runs
    out of stack, e.g. called from deep in a caller's recursion).
    """
    depth = nesting_depth(text)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (at most {max_depth} are accepted)")
    try:
        return json.loads(text, **kwargs)
    except RecursionError:
        raise ValueError(f"JSON nested too deeply to parse here (at most {max_depth} levels are accepted)") from None
