"""Progress of a save's writes or a load's reads: bytes done of the total, rate and ETA.

Called by the write and read loops (a :class:`Progress` per phase, fed the
bytes as they pass). Local, never collective; only rank 0 reports, about its
own share of the work (every rank's share is similar by construction: one file
per replica set, parts balanced across members).

- Without ``bar``: nothing for a step that ends within :data:`REPORT_AFTER_S`
  (5 s); after that, one INFO line every :data:`REPORT_EVERY_S` (10 s) such as
  ``distckpt[rank 0] write: 512.0 MiB of 1.5 GiB (33%), 120.3 MiB/s, about 8 s left``.
- With ``bar=True`` (``save_checkpoint(progress=True)``, ``load_checkpoint(progress=True)``):
  a tqdm bar on rank 0 when tqdm is installed, else the same INFO lines every second
  from the start.

A failure to report (a closed terminal) never fails the save or load.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from .logs import note

__all__ = ["REPORT_AFTER_S", "REPORT_EVERY_S", "Progress", "describe_progress", "human_bytes"]

log = logging.getLogger("distckpt")

#: Seconds a step runs before its first progress line (without a bar).
REPORT_AFTER_S = 5.0
#: Seconds between progress lines.
REPORT_EVERY_S = 10.0

B = TypeVar("B", bytes, memoryview, bytearray)


def human_bytes(n: float) -> str:
    """``"1.5 GiB"``, ``"320 B"``. Pure."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_progress(done: int, total: int, seconds: float) -> str:
    """``"512.0 MiB of 1.5 GiB (33%), 120.3 MiB/s, about 8 s left"``. Pure."""
    rate = done / seconds if seconds > 0 else 0.0
    text = f"{human_bytes(done)} of {human_bytes(total)}"
    if total > 0:
        text += f" ({min(100, 100 * done // total)}%)"
    text += f", {human_bytes(rate)}/s"
    if rate > 0 and total > done:
        text += f", about {(total - done) / rate:.0f} s left"
    return text


class Progress:
    """Counts the bytes of one phase on one rank and reports them on rank 0 (see the module)."""

    def __init__(self, phase: str, rank: int, total: int | Callable[[], int], *, bar: bool = False,
                 after: float | None = None, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.phase = phase
        self.rank = rank
        self._total = total
        self.done = 0
        self._clock = clock
        self._started = clock()
        self._want_bar = bar and rank == 0
        self._bar: Any = None
        logged_bar = bar and _tqdm() is None
        self._after = (0.0 if logged_bar else REPORT_AFTER_S) if after is None else after
        self._every = (1.0 if logged_bar else REPORT_EVERY_S) if every is None else every
        self._next = self._started + self._after

    @property
    def total(self) -> int:
        """The bytes this phase is expected to take on this rank (asked of a callable total
        on first use, inside the phase; ``0`` when that fails)."""
        if callable(self._total):
            try:
                self._total = max(0, int(self._total()))
            except Exception:  # the phase itself reports what failed
                self._total = 0
        return self._total

    def add(self, nbytes: int) -> None:
        """``nbytes`` more are done; report if it is time."""
        self.done += nbytes
        if self.rank != 0:
            return
        try:
            if self._want_bar and self._bar is None:
                self._bar = _tqdm_bar(self.phase, self.total)
                self._want_bar = self._bar is not None
            if self._bar is not None:
                self._bar.update(nbytes)
                return
            now = self._clock()
            if now >= self._next:
                self._next = now + self._every
                note(self.rank, self.phase, "%s", describe_progress(self.done, self.total, now - self._started))
        except Exception:  # reporting never fails the work it reports on
            log.debug("distckpt: progress report failed", exc_info=True)

    def track(self, chunks: Iterable[B]) -> Iterator[B]:
        """``chunks`` unchanged, counting each one's length as it is taken."""
        for chunk in chunks:
            yield chunk
            self.add(len(chunk))

    def close(self) -> None:
        """End of the phase: close the bar, if any."""
        if self._bar is not None:
            bar, self._bar = self._bar, None
            try:
                bar.close()
            except Exception:
                log.debug("distckpt: closing the progress bar failed", exc_info=True)


def _tqdm() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def _tqdm_bar(phase: str, total: int) -> Any:
    tqdm = _tqdm()
    if tqdm is None:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"distckpt {phase}")
