"""Micro-benchmarks behind the report's recommendations: ``python -m bench.micro``.

1. **Collective latency** in real gloo worlds (harness ``WorldPool``): one
   ``distckpt.collectives.exchange`` round (what each save/load phase costs at
   least) against a bare ``all_gather_object`` on a gloo group, and against
   ``broadcast_object_list`` (enough for phases where only rank 0 has news).
2. **Per-tensor costs** in-process for the ``small`` workload (10,000 tensors):
   distckpt's ``encode`` + streaming the chunks through xxh3, its TENSOR-level
   ``digest_state``, against one ``torch.cat`` per dtype + one hash (what a
   batched path would pay), and hashing the same bytes once.
"""

from __future__ import annotations

import statistics
import sys
import time
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


def main() -> int:
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
