"""SaveHandle: the future returned by an asynchronous save.

An asynchronous save is never silently lost at interpreter exit. Its thread is
not a daemon, so Python finishes it (write and commit) before exit handlers
run, and its process groups are distckpt's own, so ``destroy_process_group()``
before exit does not cut it short. If it failed and no caller saw its error
(no ``wait()`` / ``result()``), an exit handler logs the error at ERROR level
and ends the process with status 1 instead of 0.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SaveHandle"]

log = logging.getLogger("distckpt")
#: Exit status of a process whose asynchronous save failed unobserved.
UNOBSERVED_FAILURE_EXIT = 1
#: Handles whose outcome nobody has seen yet (a committed or observed one leaves).
_live: set[SaveHandle] = set()


class SaveHandle:
    """Tracks one asynchronous save running in a background thread.

    Returned by ``save_checkpoint(..., async_save=True)`` once the state has
    been copied to host memory (with ``background_staging=True``: once it has
    been walked; the copy goes on in the background until :meth:`wait_staged`).
    The write and commit phases then run in the
    background with the same guarantees as a synchronous save. The next
    ``save_checkpoint`` or ``load_checkpoint`` waits for it first and raises
    its error on every rank, unless :meth:`result` already raised it (call
    ``result()`` on every rank or on none: every rank gets the same error).
    """

    def __init__(self, path: str, staged: bool = True,
                 confirm: Callable[[], tuple[Any, bool]] | None = None) -> None:
        self.path = path
        self._confirm = confirm  # the trainer's look at its tensors once staged (distckpt.snapshots)
        self._done = threading.Event()
        self._staged = threading.Event()  # the save no longer reads the live state
        if staged:
            self._staged.set()
        self._error: BaseException | None = None
        self._observed = False
        _live.add(self)

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        if error is None:
            _live.discard(self)
        self._done.set()

    def staged(self) -> bool:
        """Whether the save has finished copying the live state to host memory. Always ``True``
        unless the save was started with ``background_staging=True``; then the trainer may
        change the saved tensors only once :meth:`wait_staged` has returned (it takes the last
        look at them), not as soon as this is ``True``."""
        return self._staged.is_set()

    def wait_staged(self, timeout: float | None = None) -> None:
        """Wait until the save no longer reads the live state (see :meth:`staged`); returns at once
        unless the save was started with ``background_staging=True``. Local: call it on the
        trainer's thread, which then looks at the saved tensors' version counters once more (an
        in-place change it started before this call has finished by now). Raises
        ``TimeoutError`` if ``timeout`` seconds pass first; a change found there fails the save
        (raised by :meth:`result` on every rank) or, if the save was already committed, raises
        :class:`~distckpt.errors.StateChangedError` here."""
        if not self._staged.wait(timeout):
            raise TimeoutError(f"asynchronous save of {self.path} still staging after {timeout} s")
        confirm, self._confirm = self._confirm, None
        late, too_late = confirm() if confirm is not None else (None, False)
        if late is not None and too_late:  # (otherwise the save fails on every rank)
            raise type(late)(f"{late.message.replace('; nothing was committed', '')}; seen only after "
                             f"the save of {self.path} had written its files: if it commits, its values "
                             "of that entry may mix the state before and after the change; do not resume from it")

    def done(self) -> bool:
        """Whether the background write and commit have finished (successfully or not)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> str:
        """Wait for the save; return the committed path or raise its error (same on every rank).

        Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._done.wait(timeout) or not self._staged.wait(  # (a failed write may end before its copy)
                None if deadline is None else max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"asynchronous save of {self.path} still running after {timeout} s")
        self._confirm = None  # the writer took its last look: the trainer may change anything now
        if self._error is not None:
            self._observed = True
            _live.discard(self)
            raise self._error
        return self.path

    def _settle(self) -> str | None:
        """Wait; raise an error nobody has seen yet; the path if committed, else ``None``."""
        self._done.wait()
        self._staged.wait()  # the next save reuses the copy's buffers
        self._confirm = None  # (lets go of the live tensors it watched)
        if self._error is None:
            return self.path
        if self._observed:
            return None
        self._observed = True
        _live.discard(self)
        raise self._error

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "committed")
        return f"SaveHandle({self.path!r}, {state})"


def _check_at_exit() -> None:
    """Exit handler: a failed asynchronous save nobody observed makes the exit status non-zero.

    Runs after Python joined the (non-daemon) save threads, so every handle
    is settled. Never aborts: logs, flushes, and leaves with
    :data:`UNOBSERVED_FAILURE_EXIT`.
    """
    lost = [h for h in list(_live) if h.done() and h._error is not None and not h._observed]
    unfinished = [h for h in list(_live) if not h.done()]
    for h in lost:
        log.error("distckpt: asynchronous save of %s failed and nobody called wait() or result(); "
                  "nothing was committed: %s", h.path, h._error)
    for h in unfinished:
        log.error("distckpt: asynchronous save of %s was still running at exit; nothing was committed", h.path)
    if lost or unfinished:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(UNOBSERVED_FAILURE_EXIT)


atexit.register(_check_at_exit)
