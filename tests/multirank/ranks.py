"""Functions that run inside real gloo rank processes (module level, so they pickle)."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from distckpt import (
    CheckpointCoordinator,
    CheckpointManifest,
    SharingPattern,
    StateComponent,
)
from distckpt.codec import encode
from tests.helpers import Box


def _mesh_groups(dims: list[tuple[str, int]]) -> dict[str, Any]:
    """Real process groups for a row-major mesh (every rank creates every group, as torch requires)."""
    world = dist.get_world_size()
    sizes = [s for _, s in dims]
    ranks = torch.arange(world).reshape(sizes)
    mine: dict[str, Any] = {}
    for d, (name, _) in enumerate(dims):
        moved = ranks.movedim(d, -1).reshape(-1, sizes[d])
        for row in moved.tolist():
            group = dist.new_group(row, backend="gloo")
            if dist.get_rank() in row:
                mine[name] = group
    return mine


def _state_for(key: str, pattern: str, rank: int, node: int, groups: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Content consistent with the pattern: identical within a replica set, distinct across sets."""
    if pattern in ("global", "replicated"):
        tag = 0
    elif pattern == "per_rank":
        tag = rank
    elif pattern == "per_node":
        tag = 100 + node
    else:
        tag = 1000 + min(groups[key.split("_")[-1]])
    g = torch.Generator().manual_seed(tag)
    return {"w": torch.randn(4, 3, generator=g), "half": torch.randn(5, generator=g).bfloat16(),
            "state": {0: {"exp_avg": torch.randn(3, generator=g), "step": tag}}, "tag": tag}


def every_pattern(ctx: Any, dims: list[tuple[str, int]], use_mesh: bool) -> dict[str, Any]:
    """Save every pattern (replicas validated), reload into fresh objects, report what happened."""
    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))
        pgs: Any = mesh
        members = {n: tuple(dist.get_process_group_ranks(mesh.get_group(n))) for n, _ in dims}
    else:
        pgs = _mesh_groups(dims)
        members = {n: tuple(dist.get_process_group_ranks(g)) for n, g in pgs.items()}
    rank, node = ctx.rank, int(os.environ["GROUP_RANK"])
    decl = [("global", "global"), ("replicated", "replicated"), ("per_rank", "per_rank"), ("per_node", "per_node")]
    decl += [(f"group_{n}", "per_group") for n, _ in dims]

    def components(fresh: bool) -> list[StateComponent]:
        out = []
        for key, pattern in decl:
            state = None if fresh else _state_for(key, pattern, rank, node, members)
            out.append(StateComponent(
                key, Box(state), pattern,
                process_group_name=key.split("_")[-1] if pattern == "per_group" else None,
                validate_replication=pattern in ("replicated", "per_node", "per_group")))
        return out

    saved = components(False)
    coord = CheckpointCoordinator(saved, process_groups=pgs, output_dir=ctx.workdir, timeout=30)
    path = coord.save_checkpoint(checkpoint_id="1")
    fresh = components(True)
    report = CheckpointCoordinator(fresh, process_groups=pgs, output_dir=ctx.workdir, timeout=30).load_checkpoint()
    exact = all(
        torch.equal(a.stateful.state["w"], b.stateful.state["w"])  # type: ignore[attr-defined]
        and torch.equal(a.stateful.state["half"], b.stateful.state["half"])  # type: ignore[attr-defined]
        and a.stateful.state["state"][0]["step"] == b.stateful.state["state"][0]["step"]  # type: ignore[attr-defined]
        for a, b in zip(saved, fresh, strict=True)
    )
    manifest = CheckpointManifest.load(path)
    return {"path": path, "exact": exact, "files": dict(report.files),
            "writers": {k: list(c.ranks) for k, c in manifest.components.items()},
            "sets": {k: [list(s) for s in c.replicated_across] for k, c in manifest.components.items()},
            "nodes": manifest.topology["nodes"]}


def dp_tp(ctx: Any, perturb_rank: int | None) -> dict[str, Any]:
    """The issue's acceptance layout: DP x TP = 2 x 4 on two nodes."""
    groups = _mesh_groups([("dp", 2), ("tp", 4)])
    rank = ctx.rank
    tp = rank % 4

    def model_state() -> dict[str, Any]:
        g = torch.Generator().manual_seed(tp)
        shard = torch.randn(8, 4, generator=g)
        return {"layer.weight": shard, "opt": {"state": {0: {"exp_avg": shard * 0.1}}}}

    def comps(model: Box, data: Box, sched: Box, rng: Box) -> list[StateComponent]:
        return [StateComponent("model", model, SharingPattern.PER_GROUP, process_group_name="dp", validate_replication=True),
                StateComponent("dataset", data, SharingPattern.PER_GROUP, process_group_name="tp"),
                StateComponent("scheduler", sched, SharingPattern.REPLICATED),
                StateComponent("rng", rng, SharingPattern.PER_RANK)]

    model = model_state()
    if perturb_rank == rank:
        model["layer.weight"][3, 1] += 1.0
    boxes = [Box(model), Box({"position": 17 + rank // 4}), Box({"last_epoch": 5}), Box({"seed": torch.tensor([rank])})]
    coord = CheckpointCoordinator(comps(*boxes), process_groups=groups, output_dir=ctx.workdir, timeout=30)
    path = coord.save_checkpoint(checkpoint_id="dp-tp")
    fresh = [Box(), Box(), Box(), Box()]
    CheckpointCoordinator(comps(*fresh), process_groups=groups, output_dir=ctx.workdir, timeout=30).load_checkpoint(path)
    exact = (torch.equal(fresh[0].state["layer.weight"], model["layer.weight"])
             and torch.equal(fresh[0].state["opt"]["state"][0]["exp_avg"], model["opt"]["state"][0]["exp_avg"])
             and fresh[1].state == {"position": 17 + rank // 4} and fresh[2].state == {"last_epoch": 5}
             and int(fresh[3].state["seed"]) == rank)
    m = CheckpointManifest.load(path)
    return {"exact": exact, "model": list(m.components["model"].ranks), "dataset": list(m.components["dataset"].ranks)}


def fail_or_die_in_write(ctx: Any, victim: int, how: str) -> str:
    """A first save succeeds; a second one fails on ``victim`` (raise or SIGKILL) during write."""
    box = Box({"w": torch.full((4,), float(ctx.rank))})
    first = CheckpointCoordinator([StateComponent("state", box, "per_rank")], output_dir=ctx.workdir,
                                  timeout=8).save_checkpoint(checkpoint_id="good")

    def hook(phase: str, rank: int) -> None:
        if phase == "write" and rank == victim:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(28, "No space left on device")

    coord = CheckpointCoordinator([StateComponent("state", box, "per_rank")], output_dir=ctx.workdir,
                                  timeout=8, phase_hook=hook)
    try:
        coord.save_checkpoint(checkpoint_id="bad")
    finally:
        assert coord.latest_checkpoint() == first
    return "saved"


def die_before_connecting(ctx: Any, victim: int) -> str:
    """``victim`` dies before constructing its coordinator; the others construct theirs."""
    if ctx.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    CheckpointCoordinator([StateComponent("state", Box({"x": 1}), "per_rank")], output_dir=ctx.workdir, timeout=3)
    return "connected"


def per_node_without_local_rank(ctx: Any) -> list[int]:
    """PER_NODE writers come from GROUP_RANK even when LOCAL_RANK is unset."""
    os.environ.pop("LOCAL_RANK", None)
    node = int(os.environ["GROUP_RANK"])
    coord = CheckpointCoordinator([StateComponent("cache", Box({"node": node}), "per_node", validate_replication=True)],
                                  output_dir=ctx.workdir, timeout=30)
    path = coord.save_checkpoint()
    return list(CheckpointManifest.load(path).components["cache"].ranks)


def async_then_mutate(ctx: Any) -> bool:
    """Async REPLICATED + PER_RANK save on gloo while the 'trainer' keeps mutating its tensors."""
    model = torch.nn.Linear(32, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    mine = Box({"rank": torch.tensor([ctx.rank])})
    comps = [StateComponent("model", model, "replicated", validate_replication=True),
             StateComponent("rng", mine, "per_rank")]
    coord = CheckpointCoordinator(comps, output_dir=ctx.workdir, timeout=30)
    handle = coord.save_checkpoint(checkpoint_id="a", async_save=True)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    t = torch.ones(1)
    dist.all_reduce(t)  # the trainer's own collectives keep working meanwhile
    path = handle.result(60)
    fresh = torch.nn.Linear(32, 32)
    out = Box()
    CheckpointCoordinator([StateComponent("model", fresh, "replicated"), StateComponent("rng", out, "per_rank")],
                          output_dir=ctx.workdir, timeout=30).load_checkpoint(path)
    return all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items()) and int(out.state["rank"]) == ctx.rank


def balanced_then_broadcast(ctx: Any) -> dict[str, Any]:
    """DP x TP = 2 x 2 on two nodes: balanced writes of REPLICATED and PER_GROUP("dp") state,
    then loads with both strategies into fresh objects."""
    pgs = _mesh_groups([("dp", 2), ("tp", 2)])
    members = {n: tuple(dist.get_process_group_ranks(g)) for n, g in pgs.items()}
    rank, node = ctx.rank, int(os.environ["GROUP_RANK"])
    decl = [("replicated", "replicated"), ("group_dp", "per_group"), ("per_rank", "per_rank"), ("per_node", "per_node")]

    def big(key: str, pattern: str) -> dict[str, Any]:
        state = _state_for(key, pattern, rank, node, members)
        g = torch.Generator().manual_seed(int(state["tag"]))
        return state | {f"layer{i}": torch.randn(64, 16, generator=g) for i in range(6)}

    def components(fresh: bool) -> list[StateComponent]:
        return [StateComponent(key, Box(None if fresh else big(key, pattern)), pattern,
                               process_group_name="dp" if pattern == "per_group" else None)
                for key, pattern in decl]

    saved = components(False)
    path = CheckpointCoordinator(saved, process_groups=pgs, output_dir=ctx.workdir, timeout=30,
                                 min_part_bytes=4096).save_checkpoint(checkpoint_id="1")
    exact = {}
    for strategy in ("read_and_broadcast", "every_member_reads"):
        fresh = components(True)
        CheckpointCoordinator(fresh, process_groups=pgs, output_dir=ctx.workdir, timeout=30,
                              load_strategy=strategy).load_checkpoint()
        exact[strategy] = all(  # equal encodings: same structure, values and bits
            encode(a.stateful.state).to_bytes() == encode(b.stateful.state).to_bytes()  # type: ignore[attr-defined]
            for a, b in zip(saved, fresh, strict=True)
        )
    manifest = CheckpointManifest.load(path)
    return {"exact": exact, "parts": {k: [(f.writer, f.part, f.parts) for f in c.files]
                                       for k, c in manifest.components.items()}}


def gathers_of_every_size(ctx: Any) -> list[list[Any]]:
    """TorchComm.all_gather with payloads inside the fast path's slot, and one rank's far beyond it."""
    from distckpt.collectives import TorchComm

    comm = TorchComm(30.0)
    small = comm.all_gather({"rank": ctx.rank}, "small")
    one_big = comm.all_gather("x" * (100_000 if ctx.rank == 1 else 10) + str(ctx.rank), "mixed")
    after = comm.all_gather(ctx.rank * 2, "after")
    return [small, [len(s) for s in one_big], [s[-1] for s in one_big], after]


def broadcasts_of_every_size(ctx: Any) -> list[Any]:
    """TorchComm.broadcast of a payload inside the slot, then of one far beyond it."""
    from distckpt.collectives import TorchComm

    comm = TorchComm(30.0)
    small = comm.broadcast({"from": ctx.rank}, "small")
    big = comm.broadcast(list(range(50_000)) if ctx.rank == 0 else None, "big")
    return [small, len(big), big[-1], comm.broadcast(ctx.rank, "after")]
