"""DTensor rank functions (module level, so they pickle): FSDP2, HSDP, TP.

They run in the test suite's gloo worlds on CPU meshes, and under torchrun with
NCCL on CUDA meshes (``tests/multirank/dtensor_torchrun.py``, the GPU workflow).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distckpt import CheckpointCoordinator, CheckpointManifest, StateComponent
from harness.trainers.dtensor_state import ModelState, OptimizerState

_OPTIONS: dict[str, Any] = {"timeout": 30}


def _device() -> torch.device:
    """This rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _mesh(shape: tuple[int, ...], dims: tuple[str, ...]) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(_device().type, shape, mesh_dim_names=dims)


def _sharded_mlp(seed: int, mesh: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small MLP under FSDP2 (HSDP on a 2-D mesh), trained one step; dims uneven on purpose."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 3)).to(_device())
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(torch.randn(5, 6, device=_device())).square().sum().backward()  # type: ignore[no-untyped-call]
    opt.step()
    opt.zero_grad()
    return model, opt


def _shards(state: Any) -> list[tuple[str, torch.Tensor, str]]:
    """(path, local shard, type name) of every tensor of a state dict, in order."""
    out: list[tuple[str, torch.Tensor, str]] = []

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, torch.Tensor):
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            out.append((path, local.detach().cpu().clone(), type(obj).__name__))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}.{i}")

    walk(state, "")
    return out


def _same(a: list[tuple[str, torch.Tensor, str]], b: list[tuple[str, torch.Tensor, str]]) -> bool:
    return len(a) == len(b) and all(
        pa == pb and ta == tb and x.dtype == y.dtype and x.shape == y.shape
        and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
        for (pa, x, ta), (pb, y, tb) in zip(a, b, strict=True))


def fsdp2_round_trip(ctx: Any, dcp_api: bool, load_options: dict[str, Any]) -> dict[str, Any]:
    """FSDP2 on a 1-D mesh of the whole world: model and AdamW state (DTensors) PER_RANK, saved
    and loaded into a fresh model and optimizer (through DCP's state-dict API or plain
    ``state_dict()``); reports whether every local shard came back bit-exact."""
    mesh = _mesh((dist.get_world_size(),), ("dp",))

    def comps(model: nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
        if dcp_api:
            return [StateComponent("model", ModelState(model), "per_rank"),
                    StateComponent("optimizer", OptimizerState(model, opt), "per_rank")]
        return [StateComponent("model", model, "per_rank"), StateComponent("optimizer", opt, "per_rank")]

    model, opt = _sharded_mlp(0, mesh)
    saved = [_shards(c.stateful.state_dict()) for c in comps(model, opt)]
    path = CheckpointCoordinator(comps(model, opt), process_groups=mesh, output_dir=ctx.workdir,
                                 **_OPTIONS).save_checkpoint(checkpoint_id="fsdp2", validate=True)
    model2, opt2 = _sharded_mlp(1, mesh)  # another initialisation and another first step
    before = [_shards(c.stateful.state_dict()) for c in comps(model2, opt2)]
    CheckpointCoordinator(comps(model2, opt2), process_groups=mesh, output_dir=ctx.workdir,
                          **load_options, **_OPTIONS).load_checkpoint(path)
    loaded = [_shards(c.stateful.state_dict()) for c in comps(model2, opt2)]
    exp_avg = opt2.state_dict()["state"][0]["exp_avg"]
    return {"exact": all(_same(a, b) for a, b in zip(saved, loaded, strict=True)),
            "differed_before": not all(_same(a, b) for a, b in zip(saved, before, strict=True)),
            "exp_avg_type": type(exp_avg).__name__, "exp_avg_placements": [str(p) for p in exp_avg.placements],
            "dtensors": sum(t == "DTensor" for s in saved for _, _, t in s),
            "writers": list(CheckpointManifest.load(path).components["optimizer"].ranks)}


def fsdp2_into_hsdp(ctx: Any) -> str:
    """Save an FSDP2 model (1-D mesh of 4) PER_RANK, then load it into an HSDP model (2 x 2):
    same world and files, another layout. Must raise on every rank."""
    flat = _mesh((4,), ("dp",))
    model, _ = _sharded_mlp(0, flat)
    path = CheckpointCoordinator([StateComponent("model", model, "per_rank")], output_dir=ctx.workdir,
                                 **_OPTIONS).save_checkpoint(checkpoint_id="flat")
    square = _mesh((2, 2), ("dp", "shard"))
    hsdp, _ = _sharded_mlp(0, square)
    CheckpointCoordinator([StateComponent("model", hsdp, "per_rank")], output_dir=ctx.workdir,
                          **_OPTIONS).load_checkpoint(path)
    return "loaded"


def misdeclared(ctx: Any, mesh_shape: tuple[int, ...], dims: tuple[str, ...], group: str) -> str:
    """An FSDP2 / HSDP model declared PER_GROUP(``group``) with validation; the save must fail."""
    mesh = _mesh(tuple(mesh_shape), tuple(dims))
    model, _ = _sharded_mlp(0, mesh)
    CheckpointCoordinator([StateComponent("model", ModelState(model), "per_group", process_group_name=group,
                                          validate_replication=True, validation_level="full")],
                          process_groups=mesh, output_dir=ctx.workdir, **_OPTIONS).save_checkpoint(checkpoint_id="bad")
    return "saved"


def tp_round_trip(ctx: Any) -> dict[str, Any]:
    """DP x TP (2 x 2) with ColwiseParallel / RowwiseParallel: model and optimizer PER_GROUP("dp"),
    validated, loaded bit-exact into a fresh model."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = _mesh((2, 2), ("dp", "tp"))

    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = parallelize_module(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).to(_device()), mesh["tp"],
                                   {"0": ColwiseParallel(), "2": RowwiseParallel()})
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        torch.manual_seed(seed + 7)
        model(torch.randn(5, 6, device=_device())).square().sum().backward()  # type: ignore[no-untyped-call]
        opt.step()
        return model, opt

    def comps(model: nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
        return [StateComponent("model", ModelState(model), "per_group", process_group_name="dp", validate_replication=True),
                StateComponent("optimizer", OptimizerState(model, opt), "per_group", process_group_name="dp",
                               validate_replication=True)]

    model, opt = build(0)
    saved = [_shards(c.stateful.state_dict()) for c in comps(model, opt)]
    path = CheckpointCoordinator(comps(model, opt), process_groups=mesh, output_dir=ctx.workdir,
                                 **_OPTIONS).save_checkpoint(checkpoint_id="tp")
    model2, opt2 = build(1)
    CheckpointCoordinator(comps(model2, opt2), process_groups=mesh, output_dir=ctx.workdir,
                          **_OPTIONS).load_checkpoint(path)
    loaded = [_shards(c.stateful.state_dict()) for c in comps(model2, opt2)]
    return {"exact": all(_same(a, b) for a, b in zip(saved, loaded, strict=True)),
            "writers": list(CheckpointManifest.load(path).components["model"].ranks)}


def hsdp_round_trip(ctx: Any, save_options: dict[str, Any]) -> dict[str, Any]:
    """HSDP on ("dp", "shard") = 2 x 2: model and optimizer PER_GROUP("dp"), validated, saved with
    ``save_options`` (balanced writes: each replica set as parts written by both members) and
    loaded bit-exact into a fresh model; reports the files' writers."""
    mesh = _mesh((2, 2), ("dp", "shard"))

    def comps(model: nn.Module, opt: torch.optim.Optimizer) -> list[StateComponent]:
        return [StateComponent("model", ModelState(model), "per_group", process_group_name="dp", validate_replication=True),
                StateComponent("optimizer", OptimizerState(model, opt), "per_group", process_group_name="dp",
                               validate_replication=True)]

    model, opt = _sharded_mlp(0, mesh)
    saved = [_shards(c.stateful.state_dict()) for c in comps(model, opt)]
    path = CheckpointCoordinator(comps(model, opt), process_groups=mesh, output_dir=ctx.workdir, **save_options,
                                 **_OPTIONS).save_checkpoint(checkpoint_id="hsdp")
    model2, opt2 = _sharded_mlp(1, mesh)
    CheckpointCoordinator(comps(model2, opt2), process_groups=mesh, output_dir=ctx.workdir,
                          **_OPTIONS).load_checkpoint(path)
    loaded = [_shards(c.stateful.state_dict()) for c in comps(model2, opt2)]
    files = CheckpointManifest.load(path).components["optimizer"].files
    return {"exact": all(_same(a, b) for a, b in zip(saved, loaded, strict=True)),
            "writers": sorted(f.writer for f in files)}
