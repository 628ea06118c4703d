"""SaveHandle: the future returned by an asynchronous save."""

from __future__ import annotations

import threading

__all__ = ["SaveHandle"]


class SaveHandle:
    """Tracks one asynchronous save running in a background thread.

    Returned by ``save_checkpoint(..., async_save=True)`` once the state has
    been copied to host memory. The write and commit phases then run in the
    background with the same guarantees as a synchronous save. The next
    ``save_checkpoint`` or ``load_checkpoint`` waits for it first and raises
    its error on every rank, unless :meth:`result` already raised it (call
    ``result()`` on every rank or on none: every rank gets the same error).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._observed = False

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()

    def done(self) -> bool:
        """Whether the background write and commit have finished (successfully or not)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> str:
        """Wait for the save; return the committed path or raise its error (same on every rank).

        Raises ``TimeoutError`` if ``timeout`` seconds pass first.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"asynchronous save of {self.path} still running after {timeout} s")
        if self._error is not None:
            self._observed = True
            raise self._error
        return self.path

    def _settle(self) -> str | None:
        """Wait; raise an error nobody has seen yet; the path if committed, else ``None``."""
        self._done.wait()
        if self._error is None:
            return self.path
        if self._observed:
            return None
        self._observed = True
        raise self._error

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed" if self._error else "committed")
        return f"SaveHandle({self.path!r}, {state})"
