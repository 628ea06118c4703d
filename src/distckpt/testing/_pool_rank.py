"""The rank-process side of :mod:`distckpt.testing.pool` (imported warm by the fork server).

A rank process serves one world at a time over its control pipe: it sets the
torchrun environment, initialises ``torch.distributed``, runs the function,
destroys the process group, restores ``os.environ`` and reports the outcome.
It exits when the pool's process dies (``PR_SET_PDEATHSIG`` on Linux and a
watchdog thread), and dumps every thread's stack to its dump file on ``SIGUSR1``.
Where tearing a world down is unsafe on this torch (:mod:`distckpt.testing._compat`), it
keeps the world's process groups alive and, after a few worlds, says in its
report that it retires, then exits without running their destructors.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, TextIO

import torch
import torch.distributed as dist

from . import _compat
from .worldspec import RankContext, place_of, sizes_of

_PR_SET_PDEATHSIG = 1
_dump_file: TextIO | None = None


def serve(conn: Connection, dump_path: str, parent_pid: int) -> None:
    """Main loop of a rank process: run worlds until told to stop or orphaned."""
    global _dump_file
    _die_with_parent(parent_pid)
    _dump_file = open(dump_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=_dump_file, all_threads=True, chain=False)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    torch.set_num_threads(1)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        _, task_id, info, payload = msg
        result = run_task(info, payload)
        result["retire"] = _compat.worlds_kept() >= _compat.WORLDS_PER_PROCESS
        try:
            conn.send(("done", task_id, result))
        except OSError:
            break
        if result["retire"]:
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_task(info: dict[str, Any], payload: bytes) -> dict[str, Any]:
    """Run one rank of one world with its environment; ``os.environ`` is restored after."""
    saved = dict(os.environ)
    try:
        os.environ.pop("NODE_RANK", None)
        os.environ.update(info["env"])
        return _execute(info, payload)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _execute(info: dict[str, Any], payload: bytes) -> dict[str, Any]:
    rank = info["rank"]
    try:
        for entry in reversed(info.get("sys_path", [])):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        fn, args, kwargs = pickle.loads(payload)
        ppn = info["procs_per_node"]
        ppn = tuple(ppn) if isinstance(ppn, list) else ppn
        node, local = place_of(sizes_of(info["nodes"], ppn), rank)
        ctx = RankContext(
            rank=rank,
            world_size=info["world_size"],
            local_rank=local,
            node_rank=node,
            nodes=info["nodes"],
            procs_per_node=ppn,
            workdir=info["workdir"],
            backend=info["backend"],
            timeout=info["timeout"],
            run_id=info["run_id"],
        )
        _init_process_group(info)
        try:
            value = fn(ctx, *args, **kwargs)
        finally:
            _destroy_process_groups()
        try:
            value_bytes = pickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"rank {rank} returned an unpicklable value: {exc}") from exc
        return {"ok": True, "value": value_bytes}
    except BaseException as exc:
        return _error(exc)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _init_process_group(info: dict[str, Any]) -> None:
    """Rendezvous through the world's ``FileStore`` and initialise the default group."""
    timeout = timedelta(seconds=info["timeout"])
    store = dist.FileStore(info["store_path"], info["world_size"])  # type: ignore[attr-defined]
    store.set_timeout(timeout)
    dist.init_process_group(
        backend=info["backend"],
        store=store,
        rank=info["rank"],
        world_size=info["world_size"],
        timeout=timeout,
    )
    # Gloo finishes connecting its full mesh at different times on different
    # ranks; a rank that returned at once and destroyed its group would make a
    # slower peer fail with "Connection closed by peer". A barrier ends setup
    # on every rank before any rank's function runs.
    dist.barrier()


def _destroy_process_groups() -> None:
    """Teardown after the function (its failure is not the function's; the deadline covers a hang)."""
    with contextlib.suppress(Exception):
        _compat.destroy_process_groups()


def _error(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    exc_bytes: bytes | None
    try:
        exc_bytes = pickle.dumps(exc)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    return {
        "ok": False,
        "error_type": f"{cls.__module__}.{cls.__qualname__}",
        "error_message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
        "exception": exc_bytes,
    }


def _die_with_parent(parent_pid: int) -> None:
    """Exit when the pool's process dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    if not _alive(parent_pid):
        os._exit(1)
    threading.Thread(target=watch, name="pool-parent-watchdog", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
