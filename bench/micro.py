"""Micro-benchmarks behind the report's recommendations: ``python -m bench.micro``.

1. **Collective latency** in real gloo worlds (harness ``WorldPool``): one
   ``distckpt.collectives.exchange`` round (what each save/load phase costs at
   least) against a bare ``all_gather_object`` on a gloo group, and against
   ``broadcast_object_list`` (enough for phases where only rank 0 has news).
2. **Per-tensor costs** in-process for the ``small`` workload (10,000 tensors):
   distckpt's ``encode`` + streaming the chunks through xxh3, its TENSOR-level
   ``digest_state``, against one ``torch.cat`` per dtype + one hash (what a
   batched path would pay), and hashing the same bytes once.
3. **The floor of a Python load** (:func:`load_floor`), in-process for
   ``small``: the steps every *safe* in-place loader written in Python takes
   (safe: the bytes that land in the live tensors are the bytes hashed). Each
   file is read straight into the live tensors, 512 per ``readv``. Every view
   is hashed with xxh3-128, inline or in a thread, whichever is faster, and the
   digest is compared. The header and skeleton are parsed with ``json.loads``.
   Each live tensor is checked as an in-place read must check it, dtype and
   shape against its entry. All of that is measured against distckpt's
   ``load_checkpoint`` and the raw read of the same bytes into one buffer. It
   builds no state dict, calls no ``load_state_dict``, and pairs by position,
   so it is a lower bound: it tells whether a goal stated per tensor is
   reachable in Python on this machine at all. ``python -m bench.micro
   floor`` runs it alone.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def _collectives(ctx: Any, n: int) -> dict[str, float]:
    import torch.distributed as dist

    from distckpt.collectives import TorchComm, exchange

    torch.set_num_threads(1)
    comm = TorchComm(60.0)
    group = dist.new_group(backend="gloo")
    payload = {"node": "host", "groups": {"dp": (0, 1)}, "declarations": [("model", "replicated")] * 4}
    out: dict[str, float] = {}
    for name, fn in (
        ("exchange", lambda: exchange(comm, "bench", lambda: payload)),
        ("TorchComm.all_gather", lambda: comm.all_gather(payload, "bench")),
        ("all_gather_object", lambda: dist.all_gather_object([None] * ctx.world_size, payload, group=group)),
        ("broadcast_object_list", lambda: dist.broadcast_object_list([payload], src=0, group=group)),
        ("barrier", lambda: dist.barrier(group=group)),
    ):
        for _ in range(3):
            fn()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n
    return out


def collectives(worlds: tuple[int, ...] = (2, 4, 8), n: int = 50) -> dict[int, dict[str, float]]:
    from distckpt.testing.pool import WorldPool, WorldSpec

    result: dict[int, dict[str, float]] = {}
    with WorldPool(max_ranks=max(worlds)) as pool:
        for w in worlds:
            per_rank = pool.run_ok(WorldSpec(nodes=1, procs_per_node=w), _collectives, n, timeout=300)
            result[w] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
    return result


def per_tensor(scale: float = 1.0, reps: int = 5) -> dict[str, float]:
    import xxhash

    from distckpt.codec import encode
    from distckpt.digests import digest_state

    from .workloads import build, tensor_leaves

    comps = build("small", scale, 0, 1)
    state = {c.key: c.holder.state_dict() for c in comps}
    tensors = tensor_leaves(state)

    def enc_and_hash() -> None:
        h = xxhash.xxh3_128()
        for c in encode(state).chunks():
            h.update(c)
        h.hexdigest()

    def enc_only() -> None:
        encode(state)

    def digest() -> None:
        digest_state(state, "tensor")

    def digest_quick() -> None:
        digest_state(state, "quick")

    def batched() -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
        h = xxhash.xxh3_128()
        for group in by_dtype.values():
            h.update(torch.cat(group).view(torch.uint8).numpy())
        h.hexdigest()

    flat = torch.cat([t.reshape(-1).view(torch.uint8) for t in tensors])

    def hash_once() -> None:
        xxhash.xxh3_128(flat.numpy()).hexdigest()

    out: dict[str, float] = {"tensors": float(len(tensors)), "bytes": float(flat.numel())}
    for name, fn in (("encode", enc_only), ("encode+chunks+xxh3", enc_and_hash), ("digest_state tensor", digest),
                     ("digest_state quick", digest_quick), ("cat per dtype + xxh3", batched),
                     ("xxh3 of the bytes once", hash_once)):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def load_floor(scale: float = 1.0, reps: int = 15, out_dir: str | None = None) -> dict[str, Any]:
    """Section 3: each step's ``(min, median, max)`` seconds over ``reps``, and the tensor count.

    ``floor`` is the sum of the medians of the three steps every safe in-place
    Python load takes: the faster of the two hashed reads (xxh3 inline, or in a
    thread as distckpt hashes: :class:`distckpt.hashing.PipelinedHasher`), the
    parse, and the check.
    """
    import xxhash

    from distckpt import CheckpointCoordinator, StateComponent
    from distckpt.codec import header_length
    from distckpt.codec.dtypes import _FROM_ST, SKELETON_KEY, span_views
    from distckpt.hashing import CHECKSUM_ALGORITHM, PipelinedHasher
    from distckpt.manifest import CheckpointManifest

    from .workloads import build, tensor_leaves

    comps = build("small", scale, 0, 1)
    tmp = tempfile.mkdtemp(prefix="distckpt-floor-", dir=out_dir)
    try:
        coord = CheckpointCoordinator([StateComponent(c.key, c.holder, c.pattern) for c in comps], output_dir=tmp)
        path = coord.save_checkpoint(checkpoint_id="floor")  # the committed checkpoint's directory
        manifest = CheckpointManifest.load(os.path.join(path, "manifest.json"))
        # (file, size, header length, the live tensors in file order, checksum). For `small` (float32 only)
        # the encoder numbers the tensors in walk order; any other order fails the check or the self-check below.
        files = []
        headers = []  # each file's JSON header, undecoded (what the timed parse starts from)
        for c in comps:
            (entry,) = manifest.components[c.key].files
            full = os.path.join(path, entry.path)
            with open(full, "rb") as f:
                start = header_length(f.read(8), entry.size_bytes, full)
                headers.append(f.read(start - 8))
            files.append((full, entry.size_bytes, start, tensor_leaves(c.holder.state_dict()), entry.checksum))
        tensors = sum(len(f[3]) for f in files)
        total = sum(f[1] for f in files)
        scratch = torch.empty(total, dtype=torch.uint8)
        whole = memoryview(scratch.numpy()).cast("B")

        def raw() -> None:
            at = 0
            for full, size, _, _, _ in files:
                fd = os.open(full, os.O_RDONLY)
                try:
                    got = 0
                    while got < size:
                        got += os.readv(fd, [whole[at + got:at + min(size, got + (1 << 20))]])
                finally:
                    os.close(fd)
                at += size

        def into_live(hashed: bool, pipelined: bool = False) -> None:
            for (full, _, start, _, checksum), (starts, sizes) in zip(files, targets, strict=True):
                views = span_views(starts, sizes)
                h: Any = PipelinedHasher() if pipelined else xxhash.xxh3_128()
                fd = os.open(full, os.O_RDONLY)
                try:
                    head = os.pread(fd, start, 0)
                    os.lseek(fd, start, os.SEEK_SET)
                    if hashed:
                        h.update(head)
                    for i in range(0, len(views), 512):
                        batch = views[i:i + 512]
                        want = sum(map(len, batch))
                        if os.readv(fd, batch) != want:
                            raise RuntimeError(f"{full}: a short read")
                        if pipelined:
                            h.update_many(batch, want)
                        elif hashed:
                            for v in batch:
                                h.update(v)
                finally:
                    os.close(fd)
                if hashed and f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}" != checksum:
                    raise RuntimeError(f"{full}: the floor's checksum differs from the manifest's")

        expected = []  # per file, each entry's (dtype, shape) in file order, as the check compares them
        for header in headers:
            entries = sorted((v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
                             for k, v in json.loads(header).items() if k != "__metadata__")
            expected.append([(_FROM_ST[st], shape) for _, st, shape in entries])

        def parse() -> None:
            for raw_header in headers:
                json.loads(json.loads(raw_header.decode("utf-8"))["__metadata__"][SKELETON_KEY])

        def check() -> list[tuple[list[int], list[int]]]:
            """Each file's targets, ``(addresses, sizes)``, gathered in the loop that checks them
            (what the read then needs: no second pass over the tensors)."""
            strided = torch.strided
            found = []
            for (_, _, _, live, _), wanted in zip(files, expected, strict=True):
                starts: list[int] = []
                sizes: list[int] = []
                for t, (dtype, shape) in zip(live, wanted, strict=True):
                    if (t.dtype is dtype and t.shape == shape and t.is_cpu and t.layout is strided
                            and t.is_contiguous() and not t.is_conj() and not t.is_neg()):
                        starts.append(t.data_ptr())
                        sizes.append(t.nbytes)
                if len(starts) != len(live):
                    raise RuntimeError("the floor's check refused a live tensor")
                found.append((starts, sizes))
            return found

        targets = check()  # the reads below go where the (timed) check found the tensors

        def load() -> None:
            coord.load_checkpoint(path)

        # The floor must really move the bytes: zero the live tensors, read, and compare with the saved values.
        saved = [t.clone() for _, _, _, live, _ in files for t in live]
        for _, _, _, live, _ in files:
            for t in live:
                t.zero_()
        into_live(True, True)
        if not all(torch.equal(a, b) for a, b in zip(saved, [t for f in files for t in f[3]], strict=True)):
            raise RuntimeError("the floor's read did not restore the saved tensors")
        del saved

        steps: list[tuple[str, Callable[[], object]]] = [
            ("raw read of the files, one buffer", raw),
            ("read into the live tensors", lambda: into_live(False)),
            ("read into live + xxh3 per view", lambda: into_live(True)),
            ("read into live, xxh3 in a thread", lambda: into_live(True, True)),
            ("parse header and skeleton (json)", parse),
            ("check each live tensor", check),
            ("distckpt load_checkpoint", load),
        ]
        out: dict[str, Any] = {"tensors": tensors, "bytes": total}
        for name, fn in steps:
            times = []
            for k in range(reps + 2):
                gc.disable()  # distckpt pauses the collector itself; so do the bare steps
                t0 = time.perf_counter()
                try:
                    fn()
                finally:
                    gc.enable()
                if k >= 2:
                    times.append(time.perf_counter() - t0)
            out[name] = (min(times), statistics.median(times), max(times))
        hashed = min(out["read into live + xxh3 per view"][1], out["read into live, xxh3 in a thread"][1])
        out["floor"] = hashed + out["parse header and skeleton (json)"][1] + out["check each live tensor"][1]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_floor(result: dict[str, Any]) -> None:
    n = result["tensors"]
    raw = result["raw read of the files, one buffer"][1]
    load = result["distckpt load_checkpoint"][1]
    floor = result["floor"]
    print(f"the floor of a Python load, small workload, in-process ({n} tensors, {result['bytes'] / 2**20:.1f} MiB; "
          "min / median / max, ms):")
    for k, v in result.items():
        if isinstance(v, tuple):
            print(f"  {k:<36} {v[0] * 1e3:7.1f} {v[1] * 1e3:7.1f} {v[2] * 1e3:7.1f}   {v[1] / n * 1e6:5.2f} us/tensor")
    print(f"  {'floor (the three steps a safe load takes)':<36} {'':7} {floor * 1e3:7.1f} {'':7}   "
          f"{floor / n * 1e6:5.2f} us/tensor")
    print(f"  floor / raw read {floor / raw:.2f}; distckpt / raw read {load / raw:.2f}; distckpt / floor {load / floor:.2f}")


def main() -> int:
    if sys.argv[1:] == ["floor"]:
        print_floor(load_floor())
        return 0
    print_floor(load_floor())
    print()
    print("per-tensor costs, small workload, in-process (median of 5):")
    pt = per_tensor()
    n = pt.pop("tensors")
    size = pt.pop("bytes")
    print(f"  {int(n)} tensors, {size / 2**20:.1f} MiB")
    for k, v in pt.items():
        print(f"  {k:<26} {v * 1e3:8.1f} ms   {v / n * 1e6:6.2f} us/tensor")
    print("\ncollective latency per call, slowest rank (gloo, this machine):")
    for w, row in collectives().items():
        print(f"  world {w}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
