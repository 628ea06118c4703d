"""Real gloo worlds of warm processes for ``check_pattern(..., processes=True)``.

A world of ``n`` ranks is ``n`` Python processes (``python -m
distckpt.testing._gloo_rank``) that join one gloo process group through a file
store and then serve commands: one JSON line in on stdin, one JSON line out on
stdout, per example. Worlds stay warm between examples (one per world size,
at most :data:`MAX_WARM` alive) and are shut down at exit. Each example names
its node layout (the ranks read ``GROUP_RANK`` per example) and its group
partitions (gloo subgroups, created once per distinct set of ranks).

Nothing is pickled: commands and results are JSON. A world that does not
answer within the deadline is killed, and the example fails with the tail of
every rank's stderr.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import IO, Any

from ..patterns import Pattern
from ..topology import Topology
from .strategies import StateSpec

__all__ = ["MAX_WARM", "GlooWorld", "run_on_gloo"]

MAX_WARM = 2
START_TIMEOUT = 120.0
STEP_TIMEOUT = 120.0
_WARM: OrderedDict[int, GlooWorld] = OrderedDict()


class GlooWorld:
    """``world_size`` rank processes joined in one gloo process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.folder = tempfile.mkdtemp(prefix="distckpt-gloo-")
        store = os.path.join(self.folder, "store")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._logs: list[IO[bytes]] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        for rank in range(world_size):
            log = open(os.path.join(self.folder, f"rank{rank}.log"), "w+b")  # noqa: SIM115 (closed in close())
            self._logs.append(log)
            env.update(RANK=str(rank), WORLD_SIZE=str(world_size), DISTCKPT_KIT_STORE=store)
            self._procs.append(subprocess.Popen(
                [sys.executable, "-m", "distckpt.testing._gloo_rank"], env=dict(env),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log))
        self._exchange({"op": "ping"}, START_TIMEOUT)

    def run(self, command: dict[str, Any], timeout: float = STEP_TIMEOUT) -> list[dict[str, Any]]:
        """Send ``command`` to every rank; their results by rank. ``AssertionError`` (after
        killing the world) when a rank dies or does not answer within ``timeout``."""
        return self._exchange(command, timeout)

    def _exchange(self, command: dict[str, Any], timeout: float) -> list[dict[str, Any]]:
        line = (json.dumps(command) + "\n").encode()
        try:
            for proc in self._procs:
                assert proc.stdin is not None
                proc.stdin.write(line)
                proc.stdin.flush()
        except OSError as exc:
            self._fail(f"could not send to a rank process ({exc})")
        deadline = time.monotonic() + timeout
        results: dict[int, dict[str, Any]] = {}
        buffers = {rank: b"" for rank in range(self.world_size)}
        while len(results) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                self._fail(f"ranks {sorted(set(range(self.world_size)) - set(results))} did not answer in {timeout:.0f} s")
            waiting = {p.stdout.fileno(): r for r, p in enumerate(self._procs) if r not in results and p.stdout}
            ready, _, _ = select.select(list(waiting), [], [], min(left, 1.0))
            for fd in ready:
                rank = waiting[fd]
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    self._fail(f"rank {rank} exited (code {self._procs[rank].poll()})")
                buffers[rank] += chunk
                if buffers[rank].endswith(b"\n"):
                    results[rank] = json.loads(buffers[rank])
        return [results[r] for r in range(self.world_size)]

    def _fail(self, why: str) -> None:
        tails = []
        for rank, log in enumerate(self._logs):
            log.flush()
            log.seek(0)
            text = log.read().decode(errors="replace").strip().splitlines()[-15:]
            tails.append(f"--- rank {rank} stderr ---\n" + "\n".join(text))
        self.close()
        _WARM.pop(self.world_size, None)
        raise AssertionError(f"gloo world of {self.world_size}: {why}\n" + "\n".join(tails))

    def close(self) -> None:
        """Ask every rank to exit, then kill what is left; remove the folder."""
        for proc in self._procs:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _world(world_size: int) -> GlooWorld:
    world = _WARM.pop(world_size, None) or GlooWorld(world_size)
    _WARM[world_size] = world
    while len(_WARM) > MAX_WARM:
        _WARM.popitem(last=False)[1].close()
    return world


@atexit.register
def _close_all() -> None:
    while _WARM:
        _WARM.popitem()[1].close()


def run_on_gloo(topology: Topology, pattern: Pattern, sets: Sequence[Sequence[int]], spec: StateSpec, out: str,
                op: dict[str, Any]) -> list[dict[str, Any]]:
    """One operation of a :func:`~distckpt.testing.check_pattern` example on a warm gloo world."""
    command = {
        "op": "step",
        "modules": sorted({type(pattern).__module__}),
        "pattern": pattern.record(),
        "nodes": [topology.node_of(r) for r in range(topology.world_size)],
        "groups": {name: [list(s) for s in part] for name, part in topology.groups.items()},
        "sets": [list(s) for s in sets],
        "spec": spec.to_json(),
        "out": out,
        "step": op,
    }
    return _world(topology.world_size).run(command)
