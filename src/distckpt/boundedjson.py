"""Bounded JSON: parse text from a checkpoint only when its nesting depth is sane.

Pure module. ``json.loads`` recurses once per nesting level, so a hostile
manifest, safetensors header or skeleton nested 100,000 deep raises
``RecursionError`` (or worse, on a small thread stack). :func:`loads` first
measures the depth (escapes and strings removed, then innermost bracket pairs
peeled off a level at a time, all in C byte operations; a vectorised running
sum in blocks where that does not settle it) and refuses a
document deeper than its limit with a ``ValueError``, which the callers turn
into :class:`~distckpt.errors.ManifestError` or
:class:`~distckpt.errors.IntegrityError` naming the file.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

__all__ = ["loads", "nesting_depth"]

_NOT_SYNTAX = bytes(b for b in range(256) if b not in b'"[]{}')
_STEP = np.zeros(256, dtype=np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1
_QUOTE = ord('"')
_BLOCK = 1 << 20
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")
#: Bytes the fast scan may go over, as a multiple of the brackets it starts with, before leaving the
#: text to the running sum: real headers and skeletons lose most of their brackets in the first pass
#: (their leaves), while a long chain nested deep would cost a pass per level.
_PEEL_WORK = 4
#: Strings holding brackets the fast scan cuts out (one ``bytes`` object each); beyond it, the running sum.
_SPLIT_LIMIT = 4096


def nesting_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (0 for a scalar).

    Brackets inside strings do not count: escapes are removed first, then a
    bracket is inside a string when an odd number of quotes precede it. For
    malformed text (an unterminated string, unbalanced brackets) the result is
    an upper bound of what a parser would reach before failing. Linear time,
    memory a few MiB at most (beyond a copy of the text's brackets and quotes).
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\" in data:
        # Valid JSON escapes only \\ and \" matter here: drop escaped backslashes (pairs, left to
        # right), then escaped quotes; any other escape (invalid JSON) is left in place, which can
        # only over-count the depth. Much faster than a regular expression over a large header.
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    syntax = data.translate(None, _NOT_SYNTAX)  # only quotes and brackets are left
    peeled = _peeled_depth(syntax)
    return _running_depth(syntax) if peeled is None else peeled


def _peeled_depth(syntax: bytes) -> int | None:
    """The exact depth of ``syntax`` (quotes and brackets only) when cheap to prove, else ``None``.

    Two adjacent quotes are dropped first (a string holding no bracket, or the end of one
    string and the start of the next): every other byte keeps the parity of the quotes before
    it, hence whether it lies inside a string. The few strings left, those holding brackets,
    are cut out. What remains are the brackets outside strings, every opener alike; one
    ``replace(b"[]", b"")`` takes off every innermost pair, so a balanced text of depth *d*
    is empty after exactly *d* passes, and an unbalanced one (malformed JSON) never empties:
    ``None`` then, as when peeling would scan more than :data:`_PEEL_WORK` times its length
    or the text holds too many strings with brackets.
    """
    syntax = syntax.replace(b'""', b"")
    if b'"' in syntax:
        if syntax.count(b'"') > _SPLIT_LIMIT:
            return None
        syntax = b"".join(syntax.split(b'"')[0::2])  # even pieces: outside strings
    brackets = syntax.translate(_SAME_BRACKETS)
    depth = 0
    budget = _PEEL_WORK * len(brackets) + 4096
    while brackets:
        budget -= len(brackets)
        if budget < 0:
            return None
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            return None
        brackets = inner
        depth += 1
    return depth


def _running_depth(syntax: bytes) -> int:
    """The deepest running sum of openers minus closers outside strings (the general case of
    :func:`nesting_depth`; an upper bound of a parser's depth for malformed text), in blocks."""
    deepest = level = 0
    quoted = False
    for start in range(0, len(syntax), _BLOCK):
        block = np.frombuffer(syntax, dtype=np.uint8, count=min(_BLOCK, len(syntax) - start), offset=start)
        quotes = np.cumsum(block == _QUOTE, dtype=np.int64)
        outside = (quotes & 1) == (1 if quoted else 0)  # an opening quote counts as inside, a closing one outside
        running = np.cumsum(_STEP[block] * outside, dtype=np.int64) + level
        deepest = max(deepest, int(running.max()))
        level = int(running[-1])
        quoted = quoted != bool(quotes[-1] & 1)
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
