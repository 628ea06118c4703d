"""Text for the ``distckpt`` command line: sizes, rank lists, tables, paths, progress.

Pure formatting shared by every command module (``_Progress`` writes to the
stream it is given). Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TextIO

from ..topology import rank_text

__all__ = ["Progress", "human_size", "rank_text", "sets_text", "short", "table"]

#: Below this many bytes ``verify`` draws no progress line.
_PROGRESS_MIN_BYTES = 64 * 1024 * 1024


def human_size(n: int) -> str:
    """``812 B``, ``1.2 KiB``, ``3.4 MiB``..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def sets_text(sets: Sequence[Sequence[int]], limit: int = 48) -> str:
    """Replica sets as ``{0,4} {1,5} ...``, shortened past ``limit`` characters."""
    full = " ".join("{" + rank_text(s) + "}" for s in sets)
    if len(full) <= limit:
        return full
    shown = ""
    for s in sets:
        piece = "{" + rank_text(s) + "} "
        if len(shown) + len(piece) > limit - 14:
            break
        shown += piece
    return f"{shown}... ({len(sets)} sets)"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces; trailing spaces stripped."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        lines.append((indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip())
    return "\n".join(lines)


def short(path: str) -> str:
    """A path as the user would like to read it: relative when under the current directory."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


class Progress:
    """A one-line byte counter on ``stream``, only when enabled and the job is large (``verify``)."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.enabled = enabled and total >= _PROGRESS_MIN_BYTES
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.stream.write(f"\rverify: {pct:5.1f}%  {human_size(self.done)} of {human_size(self.total)}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 60 + "\r")
            self.stream.flush()
