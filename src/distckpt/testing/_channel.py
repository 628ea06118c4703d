"""The parent's end of one rank process's control pipe, with no unbounded wait.

Who uses it: :class:`distckpt.testing.pool.WorldPool` only (parent side; never collective).

A ``multiprocessing`` duplex pipe is a socket pair, and its ``send``/``recv``
block without a deadline: a rank process that stops reading (frozen, stuck in
a previous world, or busy in C code) can block a large ``send`` forever, and one
that stalls halfway through a message blocks ``recv``. So every message from the
rank is read by a reader thread into the pool's inbox, every message to it is
written by a sender thread, and the caller only ever waits with a deadline.
Closing a channel shuts the socket down first, which wakes both threads.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

#: What the reader thread posts when the rank's end of the pipe is gone.
CLOSED = "distckpt.testing.channel.closed"

_JOIN_S = 2.0


class Channel:
    """One rank process's pipe: messages arrive in ``inbox`` as ``(key, message)``."""

    def __init__(self, conn: Connection, key: int, inbox: queue.Queue[tuple[int, Any]]) -> None:
        self.conn = conn
        self.key = key
        self._inbox = inbox
        self._sender: threading.Thread | None = None
        self._send_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name=f"pool-read-{key}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self._inbox.put((self.key, CLOSED))
                return
            except Exception as exc:  # an unpicklable message: report it, keep reading
                message = ("garbled", f"{type(exc).__name__}: {exc}")
            self._inbox.put((self.key, message))

    def start_send(self, message: Any) -> None:
        """Start sending ``message`` in a thread; :meth:`sent` tells when it is through.

        One send at a time: raises ``RuntimeError`` while the previous one is unfinished.
        A send that fails (the rank died) is recorded and shows as the rank's death.
        """
        if not self.sent():
            raise RuntimeError(f"channel {self.key}: the previous send has not finished")
        self._send_error = None
        self._sender = threading.Thread(
            target=self._send, args=(message,), name=f"pool-send-{self.key}", daemon=True
        )
        self._sender.start()

    def _send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except BaseException as exc:
            self._send_error = exc

    def sent(self) -> bool:
        """Whether the last send has finished (successfully or not)."""
        return self._sender is None or not self._sender.is_alive()

    def wait_sent(self, deadline: float) -> bool:
        """Wait until the last send finished or ``deadline`` (``time.monotonic()``) passed."""
        if self._sender is not None:
            self._sender.join(max(0.0, deadline - time.monotonic()))
        return self.sent()

    def send_now(self, message: Any, timeout: float) -> bool:
        """Send ``message`` and wait at most ``timeout`` seconds; ``False`` if not through."""
        self.start_send(message)
        return self.wait_sent(time.monotonic() + timeout) and self._send_error is None

    def close(self) -> None:
        """Shut the socket down (waking both threads), join them briefly, close the pipe.

        Call it after the rank process is gone or killed; it never blocks for long.
        """
        with contextlib.suppress(OSError, ValueError):
            sock = socket.socket(fileno=os.dup(self.conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()
        deadline = time.monotonic() + _JOIN_S
        self._reader.join(max(0.0, deadline - time.monotonic()))
        if self._sender is not None:
            self._sender.join(max(0.0, deadline - time.monotonic()))
        if not self._reader.is_alive():  # never close an fd a thread may still read
            with contextlib.suppress(OSError):
                self.conn.close()
