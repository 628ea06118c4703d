"""A second job, or a job that dies mid-commit, run as its own process by tests/faults/test_series_faults.py.

``python -m tests.faults.series_job MODE ARGS...`` from the repository root.
Each mode runs the fault world (``scenario.example()``) as a threaded world in
this process and prints one JSON line: per rank, ``{"path": ...}`` or
``{"error": class name, "message": ...}``.

Modes:

* ``paused OUT GEN PHASE READY GO [ID]``: save generation GEN; at the start of
  phase PHASE every rank stops, rank 0 creates READY, and all wait until GO
  exists (at most 60 s). The job holds its staging directory meanwhile.
* ``overwrite OUT GEN ID FAULT``: save generation GEN over checkpoint ID with
  ``overwrite=True`` while FAULT strikes the commit: ``exchange-then-kill``
  (SIGKILL right after the one-step swap), ``fallback-kill-between`` (no swap
  call: SIGKILL between "old out of the way" and "new in place"),
  ``fallback-rename-fails`` (no swap call: the second rename fails with EIO).
* ``fifo OUT``: load latest, save, and load ``checkpoints/checkpoint-fifo``
  explicitly, in a folder where that checkpoint's manifest is a FIFO.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from typing import Any

from distckpt import series
from tests.faults import scenario
from tests.property import worlds

EX = scenario.example()
_WAIT_S = 60.0


def _outcome(results: list[Any]) -> list[dict[str, Any]]:
    return [{"error": type(r).__name__, "message": str(r)} if isinstance(r, BaseException) else {"path": r}
            for r in results]


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + _WAIT_S
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def paused(out: str, generation: str, phase: str, ready: str, go: str, cid: str | None = None) -> Any:
    def hook(at: str, rank: int) -> None:
        if at != phase:
            return
        if rank == 0:
            open(ready, "w").close()
        _wait_for(go)

    return _outcome(worlds.save(EX, out, int(generation), hook=hook, async_save=False, checkpoint_id=cid))


def overwrite(out: str, generation: str, cid: str, fault: str) -> Any:
    final = os.path.join(out, "checkpoints", f"checkpoint-{cid}")
    real_rename = os.rename
    try:
        from distckpt import locks
    except ImportError:  # a build without the swap: it always takes the two-rename path
        locks = None  # type: ignore[assignment]

    if fault == "exchange-then-kill":
        assert locks is not None
        real_exchange = locks.rename_exchange

        def exchange_then_die(a: str, b: str) -> bool:
            done = real_exchange(a, b)
            if done:
                os.kill(os.getpid(), signal.SIGKILL)
            return done

        locks.rename_exchange = exchange_then_die  # type: ignore[assignment]
    else:
        if locks is not None:
            locks.rename_exchange = lambda a, b: False  # type: ignore[assignment]

        def second_rename(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
            if os.fspath(dst) == final and ".staging-" in os.fspath(src):
                if fault == "fallback-kill-between":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.EIO, "injected: the rename into place failed", os.fspath(src))
            real_rename(src, dst, *args, **kw)

        os.rename = second_rename  # type: ignore[assignment]
    try:
        return _outcome(worlds.save(EX, out, int(generation), async_save=False, checkpoint_id=cid, overwrite=True))
    finally:
        os.rename = real_rename


def fifo(out: str) -> Any:
    latest = worlds.load(EX, out)
    saved = worlds.save(EX, out, 3, async_save=False)
    explicit = worlds.load(EX, out, path=os.path.join(out, "checkpoints", "checkpoint-fifo"))
    listed = [(os.path.basename(e.path), e.problem)
              for e in series.list_checkpoints(os.path.join(out, "checkpoints"))]
    return {
        "latest": _outcome([r if isinstance(r, BaseException) else r[0].path for r in latest]),
        "saved": _outcome(saved),
        "explicit": _outcome([r if isinstance(r, BaseException) else r[0].path for r in explicit]),
        "listed": listed,
    }


if __name__ == "__main__":
    modes = {"paused": paused, "overwrite": overwrite, "fifo": fifo}
    print(json.dumps(modes[sys.argv[1]](*sys.argv[2:])), flush=True)
