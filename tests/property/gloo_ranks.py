"""Rank functions for hypothesis examples on real gloo worlds.

The example is drawn in the parent and shipped here pickled; a rank only
materialises its own state from it (``Example.state``), never draws.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.distributed as dist

from distckpt import CheckpointCoordinator, CheckpointError
from harness import oracle
from tests.helpers import Box
from tests.property import exact
from tests.property.strategies import Example, decl_files, unship
from tests.property.worlds import component

TIMEOUT = 30.0


def process_groups(ex: Example, rank: int, use_mesh: bool = False) -> Any:
    """Real process groups for the example's mesh (every rank creates every group, in order),
    or a DeviceMesh over it."""
    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh("cpu", tuple(s for _, s in ex.topo.mesh),
                                mesh_dim_names=tuple(n for n, _ in ex.topo.mesh))
    mine = {}
    for name, _ in ex.topo.mesh:
        for members in oracle.mesh_partition(ex.topo.mesh, name):
            pg = dist.new_group(list(members), backend="gloo")
            if rank in members:
                mine[name] = pg
    return mine


def _coordinator(ctx: Any, ex: Example, out: str, boxes: dict[str, Box], groups: Any, **kw: Any) -> CheckpointCoordinator:
    return CheckpointCoordinator([component(d, boxes[d.key]) for d in ex.decls], process_groups=groups,
                                 output_dir=out, timeout=TIMEOUT, **kw)


def _save(c: CheckpointCoordinator, ex: Example) -> str:
    if ex.async_save:
        return c.save_checkpoint(validate=ex.save_validate, async_save=True,
                                 background_staging=ex.background_staging).result(TIMEOUT)
    return c.save_checkpoint(validate=ex.save_validate)


def _check_files(ex: Example, path: str) -> list[str]:
    """Rank 0: properties 1 and 2 against the oracle."""
    problems = []
    expected = {"manifest.json"} | {f for d in ex.decls for f, _, _ in decl_files(d, ex.topo)}
    if oracle.checkpoint_files(path) != expected:
        problems.append(f"files {sorted(oracle.checkpoint_files(path) ^ expected)} differ from the oracle")
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        m = json.load(f)
    if m["topology"]["nodes"] != [list(s) for s in ex.topo.world.nodes]:
        problems.append(f"nodes {m['topology']['nodes']}")
    for d in ex.decls:
        c = m["components"][d.key]
        files = decl_files(d, ex.topo)
        if [(f["path"], f["ranks"], f["writer"]) for f in c["files"]] != [(p, list(s), w) for p, s, w in files]:
            problems.append(f"{d.key}: files {c['files']} != oracle {files}")
        for f in c["files"]:
            full = os.path.join(path, f["path"])
            if f["size_bytes"] != os.path.getsize(full) or f["checksum"] != exact.checksum_of_file(full):
                problems.append(f"{f['path']}: size or checksum wrong")
    return problems


def round_trip(ctx: Any, ex: Example, out: str, use_mesh: bool) -> dict[str, Any]:
    """Save this rank's states, check files (rank 0), load into empty boxes, compare bit-exact."""
    ex = unship(ex)
    groups = process_groups(ex, ctx.rank, use_mesh)
    boxes = {d.key: Box(ex.state(d.key, ctx.rank)) for d in ex.decls}
    c = _coordinator(ctx, ex, out, boxes, groups)
    path = _save(c, ex)
    problems = _check_files(ex, path) if ctx.rank == 0 else []
    fresh = {d.key: Box(None) for d in ex.decls}
    report = _coordinator(ctx, ex, out, fresh, groups).load_checkpoint()
    for d in ex.decls:
        problem = exact.diff(ex.expected_after_load(d.key, ctx.rank), fresh[d.key].state)
        if problem:
            problems.append(f"rank {ctx.rank} {d.key!r} ({d.pattern}): {problem}")
    return {"path": path, "loaded": report.path, "problems": problems}


class InjectedFault(RuntimeError):
    pass


def fault_in_phase(ctx: Any, ex: Example, out: str, phase: str, victim: int) -> dict[str, Any]:
    """A good save, then a save failing on ``victim`` in ``phase``; then load latest and compare."""
    ex = unship(ex)
    groups = process_groups(ex, ctx.rank, False)
    c = _coordinator(ctx, ex, out, {d.key: Box(ex.state(d.key, ctx.rank)) for d in ex.decls}, groups)
    previous = _save(c, ex)

    def hook(p: str, rank: int) -> None:
        if p == phase and rank == victim:
            raise InjectedFault(f"injected in {p} on rank {rank}")

    bad = _coordinator(ctx, ex, out, {d.key: Box(ex.state(d.key, ctx.rank, 1)) for d in ex.decls}, groups,
                       phase_hook=hook)
    outcome: dict[str, Any] = {"previous": previous}
    try:
        outcome["path"] = _save(bad, ex)
    except CheckpointError as exc:
        outcome.update(error=type(exc).__name__, failures=dict(exc.failures), message=str(exc))
    dist.barrier()  # every rank has finished failing before anyone looks at the directory
    outcome["listing"] = sorted(os.listdir(os.path.dirname(previous)))
    fresh = {d.key: Box(None) for d in ex.decls}
    outcome["loaded"] = _coordinator(ctx, ex, out, fresh, groups).load_checkpoint().path
    outcome["problems"] = [f"{d.key}: {p}" for d in ex.decls
                           if (p := exact.diff(ex.expected_after_load(d.key, ctx.rank), fresh[d.key].state))]
    return outcome
