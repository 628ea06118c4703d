"""Rank side of the benchmark: every method saves and loads the same state on the same disk.

:func:`run_case` runs inside each rank of a real gloo world (``distckpt.testing.pool``).
It builds the workload's state once, then for every repetition runs every
method's save in turn (interleaved, so that slow drifts of the machine hit all
methods alike), then every method's load. Each operation starts right after a
barrier; the rank reports its own elapsed time and the parent takes the
slowest rank. Peak RSS is measured per operation by resetting the kernel's
high-water mark (``/proc/self/clear_refs``) before it and reading ``VmHWM`` after.

Methods (``kind``):

- ``physical`` (limit): rank 0 writes the case's unique tensor bytes as one
  sequential file with ``os.write`` + ``fsync``, and reads it back into that
  same, already resident buffer.
- ``distckpt``: :class:`distckpt.CheckpointCoordinator` save / load with the
  library's defaults (loads in place, every member reads, balanced writes from
  ``min_part_bytes=256 MiB``, so sets of >= 512 MiB are split).
- ``distckpt-nohash``: the same with ``distckpt.storage.new_hasher`` replaced by
  a no-op hasher on save *and* load (so the checkpoint verifies): the cost of checksums.
- ``distckpt-quick|tensor|full``: saves with replication validation at that level.
- ``torch.save-all``: every rank ``torch.save``\\ s its full state (+ fsync).
- ``torch.save-writers``: the lowest rank of each replica set ``torch.save``\\ s
  it (= rank 0 alone for REPLICATED); every member ``torch.load``\\ s its set's file.
- ``dcp``: ``torch.distributed.checkpoint.save/load`` with FileSystemWriter/Reader.
- ``distckpt-copyload``: load only, the ``distckpt`` row's checkpoint, with
  ``load_in_place=False`` (decode into new tensors, then ``load_state_dict``
  copies them): what in-place loading (the default) gains.
- ``distckpt-bcast``: load only, the ``distckpt`` row's checkpoint, with
  ``load_strategy="read_and_broadcast"`` (the lowest rank of each replica set
  reads and verifies, then broadcasts within the set over gloo).
- ``distckpt-balanced``: save and load with ``min_part_bytes=1 MiB``: every
  REPLICATED or PER_GROUP set is written as one part per member (node by
  node); ``--nodes`` changes which members write first.
- ``distckpt-whole``: save and load with ``min_part_bytes=None``: every set
  one file, whatever the nodes (the baseline for balanced writes).
- ``distckpt-direct``: save and load with ``direct_io=True``: files written
  with ``O_DIRECT``, around the page cache (its load then reads the disk).
- ``distckpt-async-budget``: the same with ``async_snapshot_bytes`` a quarter of the
  rank's state, so the snapshot streams (the call waits for the writer).
- ``distckpt-async``: ``save_checkpoint(..., async_save=True)`` when the library
  has it; ``blocking_s`` is the time until it returns, the row's time until
  ``handle.result()``.
- ``distckpt-async-staged``: the same with ``background_staging=True``: the
  call returns after the walk, the copy goes on in the background;
  ``blocking_s`` is the time until it returns, ``staged_s`` until
  ``handle.wait_staged()`` returns when called at once (a trainer would run its
  forward and backward pass in between). ``proto-async`` is the bench's own stand-in for library
  versions without it (copy to reused host buffers, ordinary save in a thread).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import xxhash

from .workloads import (
    Comp,
    Holder,
    build,
    copy_into,
    count_tensors,
    mesh_shape,
    state_bytes,
    tensor_leaves,
)

SAVE_ONLY = {"distckpt-quick", "distckpt-tensor", "distckpt-full", "distckpt-async", "proto-async",
             "distckpt-async-budget", "distckpt-async-staged"}
#: Rows that are a :class:`distckpt.CheckpointCoordinator` with these options.
VARIANTS: dict[str, dict[str, Any]] = {
    "distckpt-copyload": {"load_in_place": False},
    "distckpt-bcast": {"load_strategy": "read_and_broadcast"},
    "distckpt-balanced": {"min_part_bytes": 1 << 20},
    "distckpt-whole": {"min_part_bytes": None},
    "distckpt-direct": {"direct_io": True},
    # async_save with a snapshot budget of a quarter of the rank's state (set per rank below)
    "distckpt-async-budget": {"async_snapshot_bytes": "quarter"},
}
LOAD_ONLY = {"distckpt-copyload", "distckpt-bcast"}
LOAD_FROM = {m: "distckpt" for m in LOAD_ONLY}
LEVELS = ("quick", "tensor", "full")
_CHUNK = 64 * 1024 * 1024


# ----------------------------------------------------------------- measuring

def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS, so that RSS growth shows what an operation allocates."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def drop_caches() -> bool:
    """sync + drop the page cache (root only); True if it worked."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class _NullHasher:
    def update(self, data: Any, /) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 32


@contextlib.contextmanager
def no_checksum() -> Iterator[None]:
    """Bypass distckpt's checksums (save and load) by swapping its hasher factory."""
    import importlib

    from distckpt import storage

    modules = [storage]
    with contextlib.suppress(ImportError):  # where the hasher lives since issue 13
        modules.append(importlib.import_module("distckpt.hashing"))
    originals = [m.new_hasher for m in modules]
    for m in modules:
        m.new_hasher = lambda algorithm="xxh3-128": _NullHasher()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, original in zip(modules, originals, strict=True):
            m.new_hasher = original  # type: ignore[attr-defined]


def _tsave(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _tload(path: str) -> Any:
    # Trusted files written by this run; weights_only=False is torch.load's fastest path.
    return torch.load(path, map_location="cpu", weights_only=False)


def _digest(comps: list[Comp]) -> str:
    h = xxhash.xxh3_64()
    for c in comps:
        if isinstance(c.holder, Holder):
            for t in tensor_leaves(c.holder.state):
                h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dir_usage(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    total = count = 0
    for root, _, files in os.walk(path):
        count += len(files)
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total, count


# ----------------------------------------------------------------- the bench

class RankBench:
    def __init__(self, ctx: Any, cfg: dict[str, Any]) -> None:
        self.rank = ctx.rank
        self.world = ctx.world_size
        self.cfg = cfg
        self.root = os.path.join(cfg["root"], f"{cfg['workload']}-w{self.world}")
        self.methods: list[str] = list(cfg["methods"])
        self.groups: dict[str, Any] = {}
        if cfg["workload"] == "hybrid":
            self._mesh_groups()
        t0 = time.perf_counter()
        self.comps = build(cfg["workload"], cfg["scale"], self.rank, self.world)
        self.build_s = time.perf_counter() - t0
        self.coords: dict[str, Any] = {}
        self._snap: dict[str, Any] = {}
        self._phase_log: list[tuple[str, float]] = []
        self._make_coordinators()
        self.digest = _digest(self.comps)
        mine = sum(state_bytes(c.holder.state_dict()) for c in self.comps if c.writer == self.rank)
        everything = [None] * self.world
        dist.all_gather_object(everything, mine)
        self.unique = int(sum(everything))  # type: ignore[arg-type]
        self.rank_bytes = sum(state_bytes(c.holder.state_dict()) for c in self.comps)
        self.rank_tensors = sum(count_tensors(c.holder.state_dict()) for c in self.comps)
        self._phys_buf: torch.Tensor | None = None
        if self.rank == 0 and "physical" in self.methods:
            self._phys_buf = torch.rand(max(1, self.unique // 4) + 1).view(torch.uint8)[: self.unique]
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)
            os.makedirs(self.root, exist_ok=True)
        dist.barrier()

    # -- setup

    def _mesh_groups(self) -> None:
        dp, tp = mesh_shape(self.world)
        for t in range(tp):
            members = [d * tp + t for d in range(dp)]
            g = dist.new_group(members, backend="gloo")
            if self.rank in members:
                self.groups["dp"] = g
        for d in range(dp):
            members = list(range(d * tp, (d + 1) * tp))
            g = dist.new_group(members, backend="gloo")
            if self.rank in members:
                self.groups["tp"] = g

    def _make_coordinators(self) -> None:
        from distckpt import CheckpointCoordinator, StateComponent

        wanted: dict[str, tuple[str, dict[str, Any]]] = {"distckpt": ("none", {})}
        for level in LEVELS:
            if f"distckpt-{level}" in self.methods:
                wanted[f"distckpt-{level}"] = (level, {})
        for name, options in VARIANTS.items():
            if name in self.methods:
                wanted[name] = ("none", options)
        if "proto-async" in self.methods:
            wanted["proto-async"] = ("none", {})
        quarter = max(1, sum(state_bytes(c.holder.state_dict()) for c in self.comps) // 4)
        for name, (level, options) in wanted.items():
            if level != "none" and not all(c.validatable for c in self.comps):
                continue
            options = {k: quarter if v == "quarter" else v for k, v in options.items()}
            comps = []
            for c in self.comps:
                holder = c.holder
                if name == "proto-async":
                    holder = Holder(None)
                    self._snap[c.key] = holder
                comps.append(StateComponent(
                    c.key, holder, c.pattern, process_group_name=c.group,
                    validate_replication=level != "none",
                    validation_level=level if level != "none" else "tensor"))
            self.coords[name] = CheckpointCoordinator(
                comps, process_groups=self.groups or None, output_dir=self.root, timeout=900,
                phase_hook=self._hook if name != "proto-async" else None, **options)
        self.methods = [m for m in self.methods if not m.startswith("distckpt-") or m in self.coords
                        or m in ("distckpt-nohash", "distckpt-async", "distckpt-async-staged")]

    # -- timing

    def _timed(self, fn: Callable[[], Any]) -> dict[str, Any]:
        _malloc_trim()
        dist.barrier()
        _reset_peak()
        base = _status_bytes("VmRSS:")
        self._phase_log.clear()
        t0 = time.perf_counter()
        extra = fn()
        end = time.perf_counter()
        peak = _status_bytes("VmHWM:")
        out = {"s": end - t0, "peak": peak, "base": base}
        if self._phase_log:
            # distckpt's phase_hook fires at the start of each phase: durations between marks.
            marks = [*self._phase_log, ("end", end)]
            phases: dict[str, float] = {"start": marks[0][1] - t0}
            for (name, at), (_, nxt) in itertools.pairwise(marks):
                phases[name] = phases.get(name, 0.0) + nxt - at
            out["phases"] = phases
        if isinstance(extra, dict):
            out.update(extra)
        return out

    def _hook(self, phase: str, rank: int) -> None:
        self._phase_log.append((phase, time.perf_counter()))

    # -- methods

    def _path(self, method: str, rep: int) -> str:
        return os.path.join(self.root, method.replace(".", "_"), f"rep-{rep}")

    def save(self, method: str, d: str) -> Any:
        if method == "physical":
            return self._phys_save(d)
        if method == "distckpt":
            self.coords["distckpt"].save_checkpoint(checkpoint_path=d)
            return None
        if method == "distckpt-nohash":
            with no_checksum():
                self.coords["distckpt"].save_checkpoint(checkpoint_path=d)
            return None
        if method in ("distckpt-async", "distckpt-async-budget", "distckpt-async-staged"):
            t0 = time.perf_counter()
            coord = self.coords["distckpt-async-budget" if method == "distckpt-async-budget" else "distckpt"]
            if method == "distckpt-async-staged":
                handle = coord.save_checkpoint(checkpoint_path=d, async_save=True, background_staging=True)
            else:
                handle = coord.save_checkpoint(checkpoint_path=d, async_save=True)
            blocking = time.perf_counter() - t0
            handle.wait_staged()
            staged = time.perf_counter() - t0
            handle.result()
            return {"blocking_s": blocking, "staged_s": staged}
        if method.startswith("distckpt-"):
            self.coords[method].save_checkpoint(checkpoint_path=d)
            return None
        if method == "torch.save-all":
            os.makedirs(d, exist_ok=True)
            _tsave({c.key: c.holder.state_dict() for c in self.comps}, os.path.join(d, f"rank-{self.rank:05d}.pt"))
            return None
        if method == "torch.save-writers":
            os.makedirs(d, exist_ok=True)
            for c in self.comps:
                if c.writer == self.rank:
                    _tsave(c.holder.state_dict(), os.path.join(d, f"{c.key}-{c.set_index:05d}.pt"))
            return None
        if method == "dcp":
            import torch.distributed.checkpoint as dcp

            dcp.save(self._dcp_state(), storage_writer=dcp.FileSystemWriter(d))
            return None
        if method == "proto-async":
            return self._async_save(d)
        raise ValueError(method)

    def load(self, method: str, d: str) -> Any:
        if method == "physical":
            return self._phys_load(d)
        if method == "distckpt" or method in VARIANTS:
            self.coords[method].load_checkpoint(d)
            return None
        if method == "distckpt-nohash":
            with no_checksum():
                self.coords["distckpt"].load_checkpoint(d)
            return None
        if method == "torch.save-all":
            obj = _tload(os.path.join(d, f"rank-{self.rank:05d}.pt"))
            for c in self.comps:
                c.holder.load_state_dict(obj[c.key])
            return None
        if method == "torch.save-writers":
            for c in self.comps:
                c.holder.load_state_dict(_tload(os.path.join(d, f"{c.key}-{c.set_index:05d}.pt")))
            return None
        if method == "dcp":
            import torch.distributed.checkpoint as dcp

            state = self._dcp_state()
            dcp.load(state, storage_reader=dcp.FileSystemReader(d))
            for c in self.comps:
                loaded = state[f"{c.key}_{c.set_index}"]
                if isinstance(c.holder, Holder):
                    c.holder.state = loaded  # DCP loaded tensors in place, values into the dict
                else:
                    c.holder.load_state_dict(loaded)
            return None
        raise ValueError(method)

    # physical limit
    def _phys_save(self, d: str) -> None:
        if self.rank != 0:
            return
        assert self._phys_buf is not None
        os.makedirs(d, exist_ok=True)
        view = memoryview(self._phys_buf.numpy()).cast("B")
        fd = os.open(os.path.join(d, "physical.bin"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            off = 0
            while off < len(view):
                off += os.write(fd, view[off:off + _CHUNK])
            os.fsync(fd)
        finally:
            os.close(fd)

    def _phys_load(self, d: str) -> None:
        if self.rank != 0:
            return
        # Into memory that is already resident (the write buffer): the pure cost of
        # moving the bytes, as a load into the trainer's existing tensors would pay.
        path = os.path.join(d, "physical.bin")
        size = os.path.getsize(path)
        assert self._phys_buf is not None and self._phys_buf.numel() >= size
        view = memoryview(self._phys_buf.numpy()).cast("B")
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < size:
                n = os.readv(fd, [view[got:got + _CHUNK]])
                if n == 0:
                    break
                got += n
        finally:
            os.close(fd)

    def _dcp_state(self) -> dict[str, Any]:
        return {f"{c.key}_{c.set_index}": c.holder.state_dict() for c in self.comps}

    # stand-in for libraries without async_save: copy into reused host buffers, then save in a thread
    def _async_save(self, d: str) -> dict[str, float]:
        t0 = time.perf_counter()
        for c in self.comps:
            snap = self._snap[c.key]
            live = c.holder.state_dict()
            if snap.state is None or not isinstance(c.holder, Holder):
                snap.state = _clone(live) if isinstance(c.holder, Holder) else live
            else:
                snap.state = copy_into(snap.state, live)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self.coords["proto-async"].save_checkpoint(checkpoint_path=d)
            except BaseException as exc:  # surfaced by result()
                errors.append(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        blocking = time.perf_counter() - t0
        thread.join()
        if errors:
            raise errors[0]
        return {"blocking_s": blocking}

    # -- the run

    def _hash_cost(self) -> dict[str, float]:
        """Seconds xxh3-128 takes on the bytes this rank writes and on those it reads."""
        from distckpt.codec import encode
        from distckpt.storage import new_hasher

        write_s = read_s = 0.0
        for c in self.comps:
            enc = encode(c.holder.state_dict())
            t0 = time.perf_counter()
            h = new_hasher()
            for chunk in enc.chunks():
                h.update(chunk)
            h.hexdigest()
            dt = time.perf_counter() - t0
            read_s += dt
            if c.writer == self.rank:
                write_s += dt
        return {"write_s": write_s, "read_s": read_s}

    def _copy_cost(self, checkpoint: str | None) -> float:
        """Seconds a contiguous copy of as many bytes as this rank wrote to ``checkpoint``'s files
        (the last ``distckpt`` save: its own part of a balanced write, no more) takes, best of 3,
        through two reused buffers of at most 256 MiB: the floor of an asynchronous save that
        copies everything it writes before it returns. 0 when it wrote nothing."""
        if checkpoint is None:
            return 0.0
        from distckpt import CheckpointManifest

        manifest = CheckpointManifest.load(checkpoint)
        nbytes = sum(f.size_bytes for c in manifest.components.values() for f in c.files if f.writer == self.rank)
        if not nbytes:
            return 0.0
        chunk = min(nbytes, 256 * 2**20)
        src = torch.ones(chunk, dtype=torch.uint8)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for start in range(0, nbytes, chunk):
                n = min(chunk, nbytes - start)
                dst[:n].copy_(src[:n])
            best = min(best, time.perf_counter() - t0)
        return best

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        reps = cfg["warmup"] + cfg["reps"]
        saves: dict[str, list[dict[str, Any]]] = {m: [] for m in self.methods if m not in LOAD_ONLY}
        loads: dict[str, list[dict[str, Any]]] = {m: [] for m in self.methods if m not in SAVE_ONLY}
        written: dict[str, int] = {}
        files: dict[str, int] = {}
        last: dict[str, str] = {}
        for rep in range(reps):
            for m in saves:
                d = self._path(m, rep)
                if self.rank == 0:
                    if m in last:  # keep only the newest checkpoint of each method
                        shutil.rmtree(last[m], ignore_errors=True)
                    os.sync()
                saves[m].append(self._timed(lambda m=m, d=d: self.save(m, d)))
                dist.barrier()
                last[m] = d
                if self.rank == 0:
                    written[m], files[m] = _dir_usage(d)
        cold_ok = None
        verified: dict[str, bool] = {}
        for rep in range(reps):
            final = rep == reps - 1
            for m in loads:
                src = last[LOAD_FROM.get(m, m)]
                if final and m != "physical":
                    for c in self.comps:
                        if isinstance(c.holder, Holder):
                            for t in tensor_leaves(c.holder.state):
                                t.zero_()
                if cfg["cold"]:
                    dist.barrier()
                    if self.rank == 0:
                        cold_ok = drop_caches()
                loads[m].append(self._timed(lambda m=m, src=src: self.load(m, src)))
                if final and m != "physical":
                    verified[m] = _digest(self.comps) == self.digest
        dist.barrier()
        copy_s = self._copy_cost(last.get("distckpt"))  # the writers at once, no rank hashing meanwhile
        dist.barrier()
        hash_cost = self._hash_cost()
        if self.rank == 0:
            shutil.rmtree(self.root, ignore_errors=True)
        return {
            "rank": self.rank, "saves": saves, "loads": loads, "written": written, "files": files,
            "unique": self.unique, "rank_bytes": self.rank_bytes, "rank_tensors": self.rank_tensors,
            "verified": verified, "cold": cold_ok, "hash": hash_cost, "copy_s": copy_s, "build_s": self.build_s,
            "methods": self.methods,
        }


def _clone(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def run_case(ctx: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Entry point run on every rank by ``WorldPool.run_ok``."""
    torch.set_num_threads(1)
    bench = RankBench(ctx, cfg)
    try:
        return bench.run()
    finally:
        # The coordinators' phase hook is a bound method of the bench: a cycle, holding the case's
        # state, that the collector's object-count thresholds may not reach for many cases (a few
        # large tensors are few objects). Break it, or the warm rank process grows case by case.
        bench.coords.clear()
        del bench
        gc.collect()
