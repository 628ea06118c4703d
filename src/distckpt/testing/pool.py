"""Warm multi-process worlds: run a function on every rank of a gloo world in < 1 s.

A :class:`WorldPool` keeps rank processes alive between worlds. They are forked
from a ``multiprocessing`` fork server that has already imported torch, so a
replacement costs a fork rather than a fresh interpreter. For each world the
ranks rendezvous through a fresh ``FileStore`` in the pool's temporary
directory, every rank gets the environment torchrun would give it,
``torch.distributed`` is initialised before the function runs and destroyed
after it returns, and ``os.environ`` is restored. The parent never imports torch.

Why a ``FileStore`` and not a ``TCPStore``: a c10d TCP client reverse-resolves
the address it connects to (``::ffff:127.0.0.1``), which ``/etc/hosts`` does not
answer; on machines whose DNS drops packets that costs a 5 s resolver timeout
in about one world out of four.

The parent's ``__main__`` module is imported by new rank processes, as with any
``multiprocessing`` start method other than fork: scripts that create a pool
need the ``if __name__ == "__main__":`` guard.

Nothing hangs: every process group and store has a timeout, every world has an
outer deadline, and on that deadline each unfinished rank dumps its Python
stacks (``faulthandler`` on ``SIGUSR1``) before it is killed and replaced; the
stacks are reported in :class:`WorldTimeout`. The deadline covers the whole
world, teardown included, and the parent's own pipe traffic: messages to and
from rank processes go through :class:`distckpt.testing._channel.Channel`, so a rank that
stops reading cannot block the parent. A rank left busy by a world its caller
abandoned (an exception or a test timeout in the parent) is replaced before the
next world rather than sent more work. A rank that dies (for instance a
fault injection that sends itself ``SIGKILL``) is reported as an outcome with
its negative signal number as ``exit_code`` while the other ranks' outcomes are
still collected. Rank processes exit when the pool's process dies.

Example::

    def add(ctx: RankContext, x: int) -> int:
        t = torch.tensor([ctx.rank + x])
        dist.all_reduce(t)
        return int(t)

    with WorldPool(max_ranks=8) as pool:
        values = pool.run_ok(WorldSpec(nodes=2, procs_per_node=4), add, 1)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ._channel import Channel
from ._pool_worker import (
    Worker,
    death,
    file_size,
    free_port,
    outcome_of,
    read_from,
    retire,
    send_signal,
)
from .worldspec import RankContext, RankOutcome, WorldSpec, WorldTimeout, rank_env

__all__ = [
    "DEFAULT_PRELOAD",
    "RankContext",
    "RankOutcome",
    "WorldPool",
    "WorldSpec",
    "WorldTimeout",
    "rank_env",
]

#: Modules the fork server imports once, so that every rank process starts warm.
DEFAULT_PRELOAD: tuple[str, ...] = ("torch", "torch.distributed", "numpy", "distckpt.testing._pool_rank")

_STACK_DUMP_WAIT_S = 0.5
_POLL_S = 0.2


class WorldPool:
    """A pool of warm rank processes reused by worlds of any size up to ``max_ranks``.

    Processes start lazily on the first world that needs them; a process that
    died or hung is replaced by the next world. One world runs at a time.
    """

    def __init__(
        self,
        max_ranks: int = 16,
        *,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        start_timeout: float = 120.0,
    ) -> None:
        if max_ranks < 1:
            raise ValueError(f"max_ranks must be >= 1, got {max_ranks}")
        self.max_ranks = max_ranks
        self.start_timeout = start_timeout
        self._preload = list(preload)
        self._ctx: multiprocessing.context.ForkServerContext | None = None
        self._workers: list[Worker] = []
        self._inbox: queue.Queue[tuple[int, Any]] = queue.Queue()
        self._root = tempfile.mkdtemp(prefix="distckpt-pool-")
        self._lock = threading.Lock()
        self._closed = False
        self._counter = 0

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> WorldPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every rank process and remove the pool's temporary files."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            if worker.usable():  # a busy rank may not be reading: it is killed instead
                worker.channel.send_now(None, timeout=1.0)
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.proc.join(max(0.0, deadline - time.monotonic()))
            retire(worker)
        self._workers.clear()
        shutil.rmtree(self._root, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @property
    def pids(self) -> list[int]:
        """Process ids of the live rank processes, in rank order of the next world."""
        return [w.pid for w in self._workers if w.proc.is_alive()]

    def warm_up(self, n: int | None = None) -> None:
        """Start ``n`` (default ``max_ranks``) rank processes now rather than lazily."""
        with self._lock:
            self._ensure_workers(self.max_ranks if n is None else n)

    # -- running worlds ----------------------------------------------------

    def run(
        self,
        spec: WorldSpec,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> list[RankOutcome]:
        """Run ``fn(ctx, *args, **kwargs)`` on every rank of ``spec``; one outcome per rank.

        Raises :class:`WorldTimeout` when some rank has not finished within
        ``timeout`` seconds (its stacks are in the exception).
        """
        if self._closed:
            raise RuntimeError("WorldPool is closed")
        if spec.world_size > self.max_ranks:
            raise ValueError(
                f"world of {spec.world_size} ranks exceeds this pool's max_ranks={self.max_ranks}"
            )
        try:
            payload = pickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(f"cannot pickle the rank function or its arguments: {exc}") from exc
        with self._lock:
            return self._run_locked(spec, payload, timeout)

    def run_ok(
        self,
        spec: WorldSpec,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 60.0,
        **kwargs: Any,
    ) -> list[Any]:
        """Like :meth:`run` but return the values; ``AssertionError`` if any rank failed."""
        outcomes = self.run(spec, fn, *args, timeout=timeout, **kwargs)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            details = "\n\n".join(o.describe() for o in outcomes if not o.ok)
            raise AssertionError(
                f"{len(failed)} of {len(outcomes)} ranks failed in {getattr(fn, '__name__', fn)}:"
                f"\n\n{details}"
            )
        return [o.value for o in outcomes]

    # -- internals ---------------------------------------------------------

    def _context(self) -> multiprocessing.context.ForkServerContext:
        if self._ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(self._preload)
            self._ctx = ctx
        return self._ctx

    def _ensure_workers(self, n: int) -> list[Worker]:
        """Return ``n`` usable workers, replacing dead, busy or retiring ones, starting missing ones.

        Raises ``RuntimeError`` (after killing the new processes) when one does not
        report ready within ``start_timeout`` or dies while starting.
        """
        usable: list[Worker] = []
        for worker in self._workers:
            if worker.usable():
                usable.append(worker)
            else:
                retire(worker)
        self._workers = usable
        starting: list[Worker] = []
        try:
            while len(self._workers) + len(starting) < n:
                starting.append(self._spawn())
            self._await_ready(starting, time.monotonic() + self.start_timeout)
        except BaseException:
            for worker in starting:
                retire(worker)
            raise
        self._workers.extend(starting)
        return self._workers[:n]

    def _await_ready(self, starting: list[Worker], deadline: float) -> None:
        waiting = {w.channel.key: w for w in starting}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pids = sorted(w.pid for w in waiting.values())
                raise RuntimeError(f"rank processes {pids} did not start in time")
            try:
                key, msg = self._inbox.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                continue
            worker = waiting.get(key)
            if worker is None:
                continue  # news from a process retired earlier
            if msg != ("ready", worker.pid):
                code = worker.proc.exitcode
                raise RuntimeError(
                    f"rank process {worker.pid} failed to start: {msg!r} (exit code {code})"
                )
            del waiting[key]

    def _spawn(self) -> Worker:
        ctx = self._context()
        self._counter += 1
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        dump_path = os.path.join(self._root, f"stacks-{self._counter}.txt")
        proc = ctx.Process(
            target=_serve,
            args=(child_conn, dump_path, os.getpid()),
            name=f"pool-rank-{self._counter}",
            daemon=True,
        )
        proc.start()
        child_conn.close()
        channel = Channel(parent_conn, self._counter, self._inbox)
        return Worker(proc=proc, channel=channel, dump_path=dump_path)

    def _run_locked(self, spec: WorldSpec, payload: bytes, timeout: float) -> list[RankOutcome]:
        workers = self._ensure_workers(spec.world_size)
        own_workdir = spec.workdir is None
        if spec.workdir is None:
            workdir = tempfile.mkdtemp(prefix="world-", dir=self._root)
        else:
            workdir = os.fspath(spec.workdir)
            os.makedirs(workdir, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        store_path = os.path.join(self._root, f"store-{run_id}")
        port = free_port()
        offsets: list[int] = []
        deadline = time.monotonic() + timeout
        try:
            for rank, worker in enumerate(workers):
                offsets.append(file_size(worker.dump_path))
                info = {
                    "rank": rank,
                    "world_size": spec.world_size,
                    "nodes": spec.nodes,
                    "procs_per_node": spec.procs_per_node,
                    "workdir": workdir,
                    "backend": spec.backend,
                    "timeout": timeout,
                    "run_id": run_id,
                    "store_path": store_path,
                    "sys_path": list(sys.path),
                    "env": rank_env(spec, rank, "127.0.0.1", port, run_id),
                }
                worker.busy = run_id
                worker.channel.start_send(("run", run_id, info, payload))
            return self._collect(workers, run_id, offsets, deadline, timeout)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(store_path)
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)

    def _collect(
        self,
        workers: list[Worker],
        task_id: str,
        offsets: list[int],
        deadline: float,
        timeout: float,
    ) -> list[RankOutcome]:
        outcomes: list[RankOutcome | None] = [None] * len(workers)
        pending = set(range(len(workers)))
        self._gather(workers, task_id, outcomes, pending, deadline)
        if not pending:
            return [o for o in outcomes if o is not None]
        # Deadline passed: dump the stuck ranks' stacks, then kill and forget them.
        undelivered = [r for r in sorted(pending) if not workers[r].channel.sent()]
        for rank in pending:
            send_signal(workers[rank].pid, signal.SIGUSR1)
        self._gather(workers, task_id, outcomes, pending, time.monotonic() + _STACK_DUMP_WAIT_S)
        stacks = {r: read_from(workers[r].dump_path, offsets[r]) for r in sorted(pending)}
        for rank in pending:
            workers[rank].proc.kill()
        stuck = [workers[rank] for rank in pending]
        for worker in stuck:
            retire(worker)
        self._workers = [w for w in self._workers if all(w is not s for s in stuck)]
        finished = [o for o in outcomes if o is not None]
        lines = [
            f"world of {len(workers)} ranks timed out after {timeout:.1f}s; "
            f"ranks {sorted(pending)} did not finish"
        ]
        if undelivered:
            lines.append(
                f"the parent could not deliver the world to ranks {undelivered} "
                "before the deadline: they were not reading their pipes"
            )
        lines += [o.describe() for o in finished if not o.ok]
        for rank, text in stacks.items():
            lines.append(f"--- stacks of rank {rank} ---\n{text.strip() or '(no dump)'}")
        raise WorldTimeout("\n".join(lines), stacks=stacks, outcomes=outcomes)

    def _gather(
        self,
        workers: list[Worker],
        task_id: str,
        outcomes: list[RankOutcome | None],
        pending: set[int],
        deadline: float,
    ) -> None:
        """Fill ``outcomes`` from results and deaths until nothing is pending or ``deadline``."""
        rank_of = {w.channel.key: rank for rank, w in enumerate(workers)}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                key, msg = self._inbox.get(timeout=min(remaining, _POLL_S))
            except queue.Empty:
                # A death normally arrives as CLOSED; this catches a pipe kept open elsewhere.
                for rank in sorted(pending):
                    if not workers[rank].proc.is_alive():
                        outcomes[rank] = death(workers[rank], rank)
                        pending.discard(rank)
                continue
            rank = rank_of.get(key, -1)
            if rank not in pending:
                continue  # news from another world or a retired process
            outcome = outcome_of(workers[rank], rank, task_id, msg)
            if outcome is not None:
                outcomes[rank] = outcome
                pending.discard(rank)


def _serve(conn: Connection, dump_path: str, parent_pid: int) -> None:
    """Entry point of a rank process (its module is preloaded by the fork server)."""
    from ._pool_rank import serve

    serve(conn, dump_path, parent_pid)


