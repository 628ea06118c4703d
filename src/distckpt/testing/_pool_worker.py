"""The parent's handle on one rank process of a :class:`~distckpt.testing.pool.WorldPool`.

Who uses it: :mod:`distckpt.testing.pool` only (parent side; nothing collective).
A :class:`_Worker` is one forked rank process with its control channel; the
functions here turn what a rank reported (or its death) into a
:class:`~distckpt.testing.worldspec.RankOutcome`, retire a process for good,
and read the stack dumps a stuck rank writes on ``SIGUSR1``. None of them
blocks for longer than a few seconds.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import traceback as tb_module
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._channel import CLOSED, Channel
from .worldspec import RankOutcome

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerProcess

KILL_WAIT_S = 5.0


@dataclass
class Worker:
    proc: ForkServerProcess
    channel: Channel
    dump_path: str
    busy: str | None = None  # the world it was sent and has not reported on yet
    retiring: bool = False  # it said it exits after the world it reported on

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def usable(self) -> bool:
        """Alive, idle and staying: fit to be sent the next world."""
        return self.proc.is_alive() and self.busy is None and not self.retiring


def outcome_of(worker: Worker, rank: int, task_id: str, msg: Any) -> RankOutcome | None:
    """The outcome ``msg`` reports for ``rank`` in world ``task_id``, or ``None`` if none."""
    if msg == CLOSED:
        return death(worker, rank)
    if not isinstance(msg, tuple) or not msg:
        return None
    if msg[0] == "garbled":
        worker.busy = None
        return RankOutcome(
            rank=rank,
            ok=False,
            error_type="distckpt.testing.pool.ResultError",
            error_message=f"the parent could not read the rank's report: {msg[1]}",
            pid=worker.pid,
        )
    if msg[0] == "done" and msg[1] == task_id:
        worker.busy = None
        worker.retiring = bool(msg[2].get("retire"))
        return outcome_from_message(rank, worker.pid, msg[2])
    return None


def death(worker: Worker, rank: int) -> RankOutcome:
    """The outcome of a rank whose pipe closed: its exit code or signal (killed if lingering)."""
    if worker.proc.is_alive():
        # The pipe closed but the process lingers: wait briefly for its exit.
        worker.proc.join(KILL_WAIT_S)
        if worker.proc.is_alive():
            worker.proc.kill()
            worker.proc.join(KILL_WAIT_S)
    code = worker.proc.exitcode
    how = (
        f"signal {signal.Signals(-code).name}"
        if code is not None and code < 0
        else f"exit code {code}"
    )
    return RankOutcome(
        rank=rank,
        ok=False,
        error_type="distckpt.testing.pool.RankDied",
        error_message=f"rank {rank} (pid {worker.pid}) died with {how}",
        exit_code=code,
        pid=worker.pid,
    )


def retire(worker: Worker) -> None:
    """Stop ``worker`` for good: wait briefly if it is exiting by itself, else kill it."""
    if worker.retiring:
        worker.proc.join(KILL_WAIT_S)
    if worker.proc.is_alive():
        worker.proc.kill()
    worker.proc.join(KILL_WAIT_S)
    worker.channel.close()


def outcome_from_message(rank: int, pid: int, data: dict[str, Any]) -> RankOutcome:
    value: Any = None
    if data["ok"]:
        try:
            value = pickle.loads(data["value"])
        except Exception:
            return RankOutcome(
                rank=rank,
                ok=False,
                error_type="distckpt.testing.pool.ResultError",
                error_message="the parent could not unpickle the rank's return value",
                traceback=tb_module.format_exc(),
                pid=pid,
            )
    exception: BaseException | None = None
    if data.get("exception") is not None:
        try:
            exception = pickle.loads(data["exception"])
        except Exception:
            exception = None
    return RankOutcome(
        rank=rank,
        ok=bool(data["ok"]),
        value=value,
        error_type=data.get("error_type"),
        error_message=data.get("error_message"),
        traceback=data.get("traceback"),
        exception=exception,
        exit_code=None,
        pid=pid,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_from(path: str, offset: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError as exc:
        return f"(cannot read stack dump {path}: {exc})"


def send_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
