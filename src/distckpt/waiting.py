"""Waiting made visible: a WARNING naming the ranks a collective still waits for.

Called by :class:`~distckpt.torchcomm.TorchComm` around the blocking part of
every collective (one ``with watch(...)`` line). Not collective itself: a
daemon thread sleeps until the collective has waited ``after`` seconds, then
asks ``absent()`` which ranks have not arrived, and logs that every ``after``
seconds until the collective returns. Only the lowest rank that has arrived
logs at WARNING (so a thousand waiting ranks print one line); the others log
the same line at DEBUG. A failure in ``absent()`` is logged at DEBUG and never
disturbs the collective.

``DISTCKPT_WAIT_WARNING_S`` sets ``after`` (default 30 s; ``0`` or a negative
value turns the warnings off). The collective's own deadline is the
coordinator's ``timeout`` (default 300 s), after which the absent ranks are
named in a :class:`~distckpt.errors.CollectiveTimeoutError` on every rank.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

__all__ = ["DEFAULT_WARN_AFTER_S", "WARN_AFTER_ENV", "describe_wait", "warn_after", "watch"]

log = logging.getLogger("distckpt")

WARN_AFTER_ENV = "DISTCKPT_WAIT_WARNING_S"
DEFAULT_WARN_AFTER_S = 30.0


def warn_after() -> float:
    """Seconds of waiting before the first warning (``0``: never), from ``DISTCKPT_WAIT_WARNING_S``."""
    text = os.environ.get(WARN_AFTER_ENV, "").strip()
    if not text:
        return DEFAULT_WARN_AFTER_S
    try:
        value = float(text)
    except ValueError:
        log.debug("distckpt: ignoring %s=%r (not a number)", WARN_AFTER_ENV, text)
        return DEFAULT_WARN_AFTER_S
    return value if value > 0 and value == value else 0.0


def describe_wait(phase: str, rank: int, waited: float, absent: Sequence[int], timeout: float) -> str:
    """The warning's text. Pure."""
    from .errors import rank_span

    if absent:
        who = f"{rank_span(absent)} {'has' if len(absent) == 1 else 'have'} not arrived yet"
    else:
        who = "every rank has arrived; the step itself is slow (a large payload or a loaded machine)"
    return (f"distckpt[rank {rank}] {phase}: waited {waited:.0f} s for the '{phase}' step: {who}; "
            f"the step fails on every rank after the timeout of {timeout:g} s (see docs/troubleshooting.md)")


@contextlib.contextmanager
def watch(phase: str, rank: int, world_size: int, absent: Callable[[], list[int]], timeout: float,
          after: float | None = None) -> Iterator[None]:
    """While the body runs, warn every ``after`` seconds (default :func:`warn_after`) naming
    the ranks ``absent()`` reports. Returns as soon as the body does; never raises itself."""
    delay = warn_after() if after is None else after
    if delay <= 0 or world_size < 2:
        yield
        return
    done = threading.Event()
    started = time.monotonic()

    def run() -> None:
        while not done.wait(delay):
            try:
                missing = sorted(absent())
            except Exception:  # a failing store shows up in the collective itself
                log.debug("distckpt: could not tell which ranks are absent", exc_info=True)
                continue
            if done.is_set():
                return
            arrived = [r for r in range(world_size) if r not in set(missing)]
            level = logging.WARNING if arrived and rank == arrived[0] else logging.DEBUG
            log.log(level, "%s", describe_wait(phase, rank, time.monotonic() - started, missing, timeout))

    thread = threading.Thread(target=run, name=f"distckpt-wait-{phase}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
