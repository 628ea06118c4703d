"""TorchComm: distckpt's collectives over torch.distributed, on gloo groups of its own.

Used by :func:`~distckpt.collectives.default_comm` when torch.distributed is
initialised with more than one rank. Objects travel on gloo process groups that
this module builds straight on the default store (``ProcessGroupGloo`` over a
``PrefixStore`` named by the channel), not through ``dist.new_group``:

* they are not in torch's registry, so ``destroy_process_group()`` while an
  asynchronous save is still committing does not pull the group from under it;
* replica-set groups are built by their members only, under names every member
  derives alone (no world-wide ``new_group`` call order to keep in step);
* after a collective failed (a dead or late peer), the group is rebuilt under a
  new name at the next collective, so the next call works once every rank
  calls again: a gloo group that timed out has its operation counters out of
  step across ranks and would never complete again.

Every collective first announces this rank's arrival in the store. When one
fails, the first rank to give up records a verdict (who did not arrive) with an
atomic ``compare_set``; every other rank, including a straggler that arrives
afterwards, raises that same verdict. So every rank names the same late or
dead rank(s), within the timeout of its own arrival.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pickle
import socket
import time
import uuid
from collections.abc import Callable, Generator, Sequence
from datetime import timedelta
from typing import Any

from . import wire
from .errors import CollectiveTimeoutError
from .waiting import watch

__all__ = ["TorchComm", "local_node_id"]

_ARRIVAL_GRACE_S = 10.0
_ENDED_WELL = "ok"


_CONNECTS = itertools.count()


def _connect_error(store: Any, arrival: str, world_size: int, timeout: float,
                   exc: Exception) -> CollectiveTimeoutError:
    """The error of a channel that could not connect: the ranks whose arrival key is missing
    (dead, hung, or never constructing their coordinator) named in ``failures``, when the
    store still answers; torch's own error in the message."""
    missing: list[int] = []
    with contextlib.suppress(Exception):  # the store's host may be the rank that died
        missing = [r for r in range(world_size) if not store.check([f"{arrival}{r}"])]
    why = "did not arrive to connect distckpt's channel (dead, hung, or no CheckpointCoordinator constructed)"
    return CollectiveTimeoutError(
        f"distckpt could not connect its gloo channel among the {world_size} ranks within {timeout:g} s; "
        f"torch said: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
        failures={r: why for r in missing}, phase="connect")


def local_node_id() -> str:
    """This rank's node identity, as a launcher set it.

    ``GROUP_RANK`` (torchrun's node index), else ``NODE_RANK``, else the host
    name. Never ``LOCAL_RANK``: a missing LOCAL_RANK must not make every rank a
    node of its own.
    """
    for var in ("GROUP_RANK", "NODE_RANK"):
        value = os.environ.get(var)
        if value not in (None, ""):
            return f"{var}={value}"
    return f"host={socket.gethostname()}"


class TorchComm:
    """torch.distributed world; objects travel on gloo groups of its own, with a timeout.

    Constructing one is collective (it creates a process group): every rank
    must construct it, in the same order as its other coordinators. Not
    thread-safe: one thread uses a channel at a time (:meth:`fork` gives an
    asynchronous save its own).
    """

    def __init__(self, timeout: float) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.timeout = timeout
        self._store: Any = dist.distributed_c10d._get_default_store()
        # Every construction is a world collective (new_group): the world's group count before it
        # is the same on every rank, so its arrival key names the ranks that never came if
        # connecting fails (a process-wide count where torch keeps none).
        count = getattr(getattr(dist.distributed_c10d, "_world", None), "group_count", None)
        arrival = f"distckpt/connect/{count if type(count) is int else next(_CONNECTS)}/"
        try:
            self._store.set(f"{arrival}{self.rank}", _ENDED_WELL)
            # Rank 0 names this channel for everyone, so store keys agree across ranks even
            # when processes built different numbers of coordinators before.
            naming = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
            name = [uuid.uuid4().hex if self.rank == 0 else None]
            dist.broadcast_object_list(name, src=0, group=naming)
            self._serial = str(name[0])
            self._ledger = _Ledger(self._store, self._serial, self.rank, self.world_size)
            self._seq = 0
            self._epoch = "init"  # names the current groups: "init", or the collective that rebuilt them
            self._broken = False
            self._retired: list[Any] = [naming]  # kept alive: never destroyed mid-run
            self._group = self._gloo("world", tuple(range(self.world_size)))
        except Exception as exc:  # a dead, hung or absent peer: gloo and the store raise their own errors
            raise _connect_error(self._store, arrival, self.world_size, timeout, exc) from exc
        self._sets: dict[tuple[int, ...], Any] = {}

    def group_members(self, group: Any) -> tuple[int, ...]:
        return tuple(sorted(self._dist.get_process_group_ranks(group)))

    def node_id(self) -> str:
        return local_node_id()

    def fork(self) -> TorchComm:
        """Collective: an independent channel (its own gloo group) among the same ranks."""
        return TorchComm(self.timeout)

    @property
    def broken(self) -> bool:
        """Whether the last collective failed (the next one rebuilds the groups first)."""
        return self._broken

    # ------------------------------------------------------------ groups

    def _gloo(self, label: str, members: tuple[int, ...]) -> Any:
        """A gloo group of ``members`` (this rank among them), named by channel, epoch and label.

        Blocks until every member built it, or raises after ``timeout``.
        """
        prefix = f"distckpt/{self._serial}/{self._epoch}/{label}/"
        from torch._C._distributed_c10d import PrefixStore

        return self._dist.ProcessGroupGloo(PrefixStore(prefix, self._store),
                                           members.index(self.rank), len(members),
                                           timedelta(seconds=self.timeout))

    def _rebuild(self, seq: int) -> None:
        """After a failed collective: fresh groups, named after collective ``seq`` (collective).

        Every rank failed the same collective, so all rebuild at the same
        ``seq``; if the rebuild fails too, the next collective tries again
        under its own name.
        """
        self._retired += [self._group, *self._sets.values()]
        self._sets.clear()
        self._epoch = f"s{seq}"
        self._group = self._gloo("world", tuple(range(self.world_size)))
        self._broken = False

    def _set_group(self, members: tuple[int, ...]) -> Any:
        if members not in self._sets:
            self._sets[members] = self._gloo("set-" + "-".join(map(str, members)), members)
        return self._sets[members]

    # ------------------------------------------------------------ collectives

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._collective(phase, lambda: self._gather_objects(obj, out))
        return out

    def broadcast(self, obj: Any, phase: str) -> Any:
        box = [obj if self.rank == 0 else None]
        self._collective(phase, lambda: self._broadcast_object(box))
        return box[0]

    def broadcast_in_sets(self, sets: Sequence[tuple[int, ...]], tensors: Sequence[Any], phase: str) -> None:
        """Collective over the world: send ``tensors`` from the lowest rank of this rank's set to the set.

        ``sets`` (identical on every rank) partition the world. Every rank first
        waits until all ranks arrived (so a rank that died before this step is
        named by everyone, not only by its set), then each set of two or more
        broadcasts on its own gloo group, concurrently with the other sets.
        Raises :class:`CollectiveTimeoutError` naming the missing rank(s).
        """
        mine = next(m for m in sets if self.rank in m)

        def run() -> None:
            if len(mine) < 2:
                return
            group = self._set_group(mine)
            for t in tensors:
                _wait(group.broadcast([t], _root(self._dist.BroadcastOptions(), 0)))

        self._collective(phase, run, everyone_first=True)

    def _gather_objects(self, obj: Any, out: list[Any]) -> None:
        """All-gather of pickles as gathers to rank 0 and broadcasts from it (:func:`wire.gather_steps`).

        Direct hops instead of a ring all-gather (measured 2.6 ms instead of 20
        ms at 8 ranks on 2 cores, ``bench/results``); small worlds take one
        round of fixed slots, larger ones send lengths first so that nothing is
        padded beyond the longest payload and what a rank receives grows
        linearly with the world.
        """
        gathered = self._drive(wire.gather_steps(self.rank, self.world_size, _pickle(obj)))
        out[:] = [pickle.loads(p) for p in wire.split(gathered, self.world_size)]

    def _broadcast_object(self, box: list[Any]) -> None:
        """Rank 0's ``box[0]`` in one broadcast of a fixed-size slot; a larger payload takes a
        second broadcast of its exact size, which the slot announces (:func:`wire.broadcast_steps`)."""
        payload = self._drive(wire.broadcast_steps(self.rank, _pickle(box[0]) if self.rank == 0 else b""))
        if self.rank != 0:
            box[0] = pickle.loads(payload)

    def _drive(self, steps: Generator[wire.Step, Any, Any]) -> Any:
        """Run :mod:`distckpt.wire`'s steps on this channel's world group; what they end with."""
        import torch

        answer: Any = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration as stop:
                return stop.value
            if isinstance(step, wire.Gather):
                rows = [torch.empty_like(step.send) for _ in range(self.world_size)] if self.rank == 0 else []
                _wait(self._group.gather([rows] if self.rank == 0 else [], [step.send],
                                         _root(self._dist.GatherOptions(), 0)))
                answer = rows or None
            else:
                tensor = step.tensor if self.rank == 0 else torch.empty(step.numel, dtype=step.dtype)
                _wait(self._group.broadcast([tensor], _root(self._dist.BroadcastOptions(), 0)))
                answer = tensor

    # ------------------------------------------------------------ the error protocol

    def _collective(self, phase: str, run: Callable[[], None], everyone_first: bool = False) -> None:
        """Announce arrival, adopt a verdict peers already reached, heal, run; on failure settle one verdict.

        ``everyone_first`` (a step whose ranks do not all talk to each other,
        like the per-set broadcasts): wait until every rank arrived before
        ``run``, and until every rank finished after it, so that all ranks
        reach one verdict even when only some of them saw the failure.
        """
        seq = self._seq
        self._seq += 1
        started = time.monotonic()
        deadline = started + self.timeout
        if self._ledger.arrive(seq, phase):  # peers gave up on this collective before this rank arrived
            self._broken = True
            raise _timeout_error(phase, self._ledger.verdict(seq, {}))
        outcome = ""
        arrived = False
        try:
            with watch(phase, self.rank, self.world_size, lambda: self._ledger.absent(seq), self.timeout):
                if self._broken:
                    self._rebuild(seq)
                if everyone_first:
                    self._ledger.await_arrivals(seq, deadline)
                    arrived = True
                run()
        except Exception as exc:
            outcome = f"'{phase}' collective failed: {type(exc).__name__}: {exc}"
            if not everyone_first:
                self._broken = True
                missing = self._ledger.missing(seq, deadline)
                proposal = _absent(phase, self.timeout, missing) or {self.rank: outcome}
                raise _timeout_error(phase, self._ledger.verdict(seq, proposal)) from exc
        if everyone_first:
            failures = self._ledger.settle(seq, deadline, outcome, phase, self.timeout, arrived)
            if failures:
                self._broken = True
                raise _timeout_error(phase, failures)


class _Ledger:
    """One channel's bookkeeping in the store: arrivals, endings and verdicts of its collectives.

    Keys: ``distckpt/<channel>/<seq>/<rank>`` (arrived), ``.../<seq>/end/<rank>``
    (finished: "ok" or what failed; only for steps that wait for everyone),
    both deleted two collectives later, and ``.../<seq>/verdict`` (the failures
    everyone raises; first writer wins; kept). A store that fails degrades to
    this rank's own view.
    """

    def __init__(self, store: Any, serial: str, rank: int, world_size: int) -> None:
        self.store, self.serial, self.rank, self.world_size = store, serial, rank, world_size
        self._ended: set[int] = set()  # collectives where this rank left an ending key

    def key(self, seq: int, *rest: int | str) -> str:
        return "/".join(["distckpt", self.serial, str(seq), *map(str, rest)])

    def arrive(self, seq: int, phase: str) -> bool:
        """Announce this rank at ``seq``; whether a verdict on ``seq`` exists already."""
        try:
            self.store.set(self.key(seq, self.rank), phase)
            if seq >= 2:
                self.store.delete_key(self.key(seq - 2, self.rank))
            if seq - 2 in self._ended:
                self._ended.discard(seq - 2)
                self.store.delete_key(self.key(seq - 2, "end", self.rank))
            return bool(self.store.check([self.key(seq, "verdict")]))
        except Exception:  # a store that fails shows up in the collective itself
            return False

    def absent(self, seq: int) -> list[int]:
        """Ranks with no arrival key at ``seq`` yet: one look, no waiting (for the wait warnings)."""
        return [r for r in range(self.world_size) if not self.store.check([self.key(seq, r)])]

    def await_arrivals(self, seq: int, deadline: float) -> None:
        """Block until every rank arrived at ``seq``; raises once ``deadline`` passed."""
        keys = [self.key(seq, r) for r in range(self.world_size)]
        self.store.wait(keys, timedelta(seconds=max(0.1, deadline - time.monotonic())))

    def verdict(self, seq: int, proposal: dict[int, str]) -> dict[int, str]:
        """The failures of collective ``seq``: the first proposal recorded in the store wins."""
        try:
            agreed = self.store.compare_set(self.key(seq, "verdict"), "",
                                            json.dumps({str(r): m for r, m in proposal.items()}))
            return {int(r): str(m) for r, m in json.loads(agreed).items()}
        except Exception:
            return proposal or {self.rank: "a peer gave up on this step (its verdict could not be read)"}

    def missing(self, seq: int, deadline: float, what: str = "") -> list[int]:
        """Ranks with no ``what`` key (arrival by default) at ``seq``.

        A live rank always arrives, possibly late on a loaded machine; only a
        dead or stuck one never does. So stragglers get up to 10 s, but never
        past the collective's deadline: every rank still raises within the timeout.
        """
        until = min(time.monotonic() + _ARRIVAL_GRACE_S, deadline)
        missing = list(range(self.world_size))
        try:
            while True:
                missing = [r for r in missing if not self.store.check([self.key(seq, *([what] if what else []), r)])]
                if not missing or time.monotonic() > until:
                    return missing
                time.sleep(0.05)
        except Exception:
            return []

    def settle(self, seq: int, deadline: float, outcome: str, phase: str, timeout: float,
               arrived: bool) -> dict[int, str]:
        """Record how this rank ended ``seq``, wait for every rank's ending; the agreed failures or ``{}``.

        Ranks that never arrived did not reach the step (``arrived``: every
        rank is known to have arrived); else ranks that never ended died or
        hung in it; else the ranks whose step failed.
        """
        try:
            self.store.set(self.key(seq, "end", self.rank), outcome or _ENDED_WELL)
            self._ended.add(seq)
        except Exception:
            return {self.rank: outcome} if outcome else {}
        absent = [] if arrived else self.missing(seq, deadline)
        if absent:  # the step could not complete anywhere: only the absent are to blame
            return self.verdict(seq, _absent(phase, timeout, absent))
        ends = [self.key(seq, "end", r) for r in range(self.world_size)]
        try:
            self.store.wait(ends, timedelta(seconds=max(0.1, deadline - time.monotonic())))
            endings = {r: self.store.get(k).decode() for r, k in enumerate(ends)}
        except Exception:
            unended = self.missing(seq, deadline, "end")
            return self.verdict(seq, {r: f"died or hung during the '{phase}' step" for r in unended}
                                or {self.rank: outcome or "its peers' endings could not be read"})
        failed = {r: m for r, m in endings.items() if m != _ENDED_WELL}
        return self.verdict(seq, failed) if failed else {}


def _absent(phase: str, timeout: float, missing: Sequence[int]) -> dict[int, str]:
    """Failures for ranks that never arrived at a step."""
    return {r: f"did not reach the '{phase}' step within {timeout:g}s "
               "(process died, hung, never called it, or arrived too late)" for r in missing}


def _timeout_error(phase: str, failures: dict[int, str]) -> CollectiveTimeoutError:
    return CollectiveTimeoutError(f"checkpoint '{phase}' step could not complete: a peer is unreachable",
                                  failures=failures, phase=phase)


def _root(opts: Any, rank: int) -> Any:
    opts.rootRank = rank
    return opts


def _wait(work: Any) -> None:
    work.wait()


def _pickle(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
