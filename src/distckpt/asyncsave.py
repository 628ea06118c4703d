"""Asynchronous staging: the write and commit of a save, in a background thread on a channel of its own.

Called by the coordinator's facade: :meth:`AsyncSaves.start` from
``save_checkpoint(async_save=True)`` after the plan and validation phases,
:meth:`AsyncSaves.wait` at the start of every save and load and from
``CheckpointCoordinator.wait()``. The snapshot to host memory happens on the
caller's thread, so the training loop may change its tensors as soon as
:meth:`start` returns. The background thread runs the write and commit phases
(:mod:`distckpt.saving`) on a channel forked from the coordinator's
(:meth:`~distckpt.transport.ForkingComm.fork`), so its collectives never interleave
with a later synchronous call's. Its outcome travels in a
:class:`~distckpt.handle.SaveHandle`; on failure rank 0 removes the staging
directory and the error waits for the next :meth:`wait` (on every rank).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from . import folder
from .handle import SaveHandle
from .planning import Produce, SavePlan
from .transport import Comm, ForkingComm, check_comm

__all__ = ["AsyncSaves"]

log = logging.getLogger("distckpt")


class AsyncSaves:
    """The asynchronous saves of one coordinator: its background channel, the pending save,
    and the host buffers of the last snapshot (reused by the next one)."""

    def __init__(self) -> None:
        self.comm: ForkingComm | None = None
        self.pending: SaveHandle | None = None
        # Host buffers of the last asynchronous snapshot, reused by the next one.
        self.snapshots: dict[str, dict[int, torch.Tensor]] = {}

    def channel(self, comm: Comm) -> Comm:
        """The background channel, forked from ``comm`` on first use or after its last collective failed.

        Collective (forking builds process groups; that failure reached every
        rank, so every rank replaces it together). The background thread never
        builds groups itself. ``TypeError`` when ``comm`` is not a
        :class:`~distckpt.transport.ForkingComm` (the facade checks that first).
        """
        if self.comm is None or self.comm.broken:
            check_comm(comm, ForkingComm, "async_save")
            assert isinstance(comm, ForkingComm)
            self.comm = comm.fork()
        return self.comm

    def start(self, comm: Comm, plan: SavePlan, snapshot: Callable[[dict[str, dict[int, torch.Tensor]]], Produce],
              finish: Callable[[Comm, Produce], None], started: float) -> SaveHandle:
        """Fork the channel if needed, snapshot this rank's files (``snapshot(buffers)``), then run
        ``finish(channel, produce)`` (the write and commit phases) in a non-daemon thread.

        Returns at once with the :class:`SaveHandle`. On failure of the
        thread, rank 0 removes the staging directory and the handle holds the error.
        """
        background = self.channel(comm)
        produce = snapshot(self.snapshots)
        pump = getattr(produce, "pump", None)  # snapshots beyond the memory budget stream (distckpt.snapshots)
        handle = SaveHandle(plan.path)
        log.debug("distckpt: %s snapshotted in %.3f s; writing in the background", plan.path,
                  time.perf_counter() - started)

        def run() -> None:
            try:
                finish(background, produce)
            except BaseException as exc:
                if comm.rank == 0:
                    folder.discard_staging(plan.staging)
                handle._finish(exc)
            else:
                handle._finish(None)

        self.pending = handle
        threading.Thread(target=run, name=f"distckpt-save-{plan.checkpoint_id}", daemon=False).start()
        if pump is not None:
            pump()  # returns once every file is copied; the thread writes them meanwhile
        return handle

    def wait(self) -> str | None:
        """Finish the pending save: its path, ``None`` if there was none (or its error was already
        raised by :meth:`SaveHandle.result`); raises its error otherwise."""
        handle, self.pending = self.pending, None
        return None if handle is None else handle._settle()
