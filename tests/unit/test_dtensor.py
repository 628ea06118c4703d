"""DTensor leaves on a one-rank gloo world: encoding, layout checks, restore, digests, guarded imports."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from distckpt import (
    CheckpointCoordinator,
    IntegrityError,
    LayoutMismatchError,
    SerializationError,
    StateComponent,
    StateMismatchError,
    TopologyMismatchError,
)
from distckpt import dtensor as dt
from distckpt.codec import SKELETON_KEY, decode, encode, state_nbytes
from distckpt.digests import STRUCTURE, digest_state

pytestmark = pytest.mark.skipif(not dist.is_available() or dt.dtensor_type() is None,
                                reason="this torch has no DTensor")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Any]:
    """A one-rank gloo world and a 1-D mesh named "dp"; the default group is destroyed afterwards
    so that the rest of the session sees no process group."""
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


def sharded(mesh: Any, t: torch.Tensor, placement: str = "shard") -> Any:
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor  # type: ignore[no-redef]

    return distribute_tensor(t, mesh, [Shard(0) if placement == "shard" else Replicate()])


def test_a_dtensor_is_stored_as_its_local_shard_with_its_layout_beside_it(mesh: Any) -> None:
    d = sharded(mesh, torch.randn(6, 4, dtype=torch.bfloat16))
    raw = encode({"w": d, "plain": torch.arange(3)}).to_bytes()
    tensors = safetensors.torch.load(raw)  # any safetensors reader sees the shard's bytes
    skeleton = json.loads(_metadata(raw)[SKELETON_KEY])
    node = dict(skeleton["$dict"])["w"]
    assert node == {"$dtensor": {"$tensor": node["$dtensor"]["$tensor"]}, "placements": ["Shard(0)"],
                    "mesh_dims": ["dp"], "mesh_shape": [1], "coordinate": [0], "shape": [6, 4], "stride": [4, 1]}
    stored = tensors[node["$dtensor"]["$tensor"]]
    assert torch.equal(stored.view(torch.int16), d.to_local().view(torch.int16))
    assert state_nbytes({"w": d}) == d.to_local().numel() * 2


def _metadata(raw: bytes) -> dict[str, str]:
    length = int.from_bytes(raw[:8], "little")
    meta: dict[str, str] = json.loads(raw[8:8 + length])["__metadata__"]
    return meta


def test_a_decoded_dtensor_restores_into_the_live_one_in_place(mesh: Any) -> None:
    saved = sharded(mesh, torch.randn(5, 3))
    live = sharded(mesh, torch.zeros(5, 3))
    local_before = live.to_local()
    state = dt.restore(decode(bytearray(encode({"w": saved}).to_bytes())), {"w": live}, "f")
    assert state["w"] is live and live.to_local().data_ptr() == local_before.data_ptr()
    assert torch.equal(live.to_local(), saved.to_local())


def test_restore_without_in_place_leaves_the_live_dtensor_untouched(mesh: Any) -> None:
    saved = sharded(mesh, torch.randn(5, 3))
    live = sharded(mesh, torch.zeros(5, 3))
    calls: list[int] = []

    def provider() -> dict[str, Any]:
        calls.append(1)
        return {"w": live}

    state = dt.restore(decode(bytearray(encode({"w": saved, "n": 3}).to_bytes())), provider, "f", in_place=False)
    assert type(state["w"]) is dt.dtensor_type() and state["w"] is not live
    assert torch.equal(state["w"].to_local(), saved.to_local()) and not live.to_local().any()
    assert state["w"].placements == live.placements and calls == [1]
    assert dt.restore({"n": 3}, provider, "f") == {"n": 3} and calls == [1]  # no DTensor: never asks


def test_a_layout_mismatch_names_the_entry_and_sends_resharding_to_dcp(mesh: Any) -> None:
    skeleton = json.loads(_metadata(encode({"opt": {"w": sharded(mesh, torch.randn(4, 2))}}).to_bytes())[SKELETON_KEY])
    with pytest.raises(LayoutMismatchError) as caught:
        dt.check_skeleton(skeleton, {"opt": {"w": sharded(mesh, torch.randn(4, 2), "replicate")}}, "m.safetensors")
    text = str(caught.value)
    assert "m.safetensors: entry opt.w: placements [Shard(0)] saved, [Replicate()] live" in text
    assert "torch.distributed.checkpoint" in text
    assert isinstance(caught.value, StateMismatchError) and isinstance(caught.value, TopologyMismatchError)
    with pytest.raises(LayoutMismatchError, match=r"global shape \[4, 2\] saved, \[8, 2\] live"):
        dt.check_skeleton(skeleton, {"opt": {"w": sharded(mesh, torch.randn(8, 2))}}, "m")
    with pytest.raises(LayoutMismatchError, match="the live state holds a Tensor there"):
        dt.check_skeleton(skeleton, {"opt": {"w": torch.randn(4, 2)}}, "m")
    with pytest.raises(LayoutMismatchError, match="get_optimizer_state_dict initialises it"):
        dt.check_skeleton(skeleton, {"opt": {}}, "m")
    plain = json.loads(_metadata(encode({"opt": {"w": torch.randn(4, 2)}}).to_bytes())[SKELETON_KEY])
    with pytest.raises(LayoutMismatchError, match="saved as a plain tensor, the live entry is a DTensor"):
        dt.check_skeleton(plain, {"opt": {"w": sharded(mesh, torch.randn(4, 2))}}, "m")
    dt.check_skeleton(skeleton, {"opt": {"w": sharded(mesh, torch.zeros(4, 2))}}, "m")  # same layout: fine


def test_layouts_compare_mesh_placements_shape_and_the_coordinate_of_sharded_dimensions() -> None:
    base = dt.Layout(("Replicate()", "Shard(0)"), ("dp", "shard"), (2, 2), (None, 1), (8, 3), (3, 1))
    assert base.differences(dt.Layout(("Replicate()", "Shard(0)"), ("dp", "shard"), (2, 2), (1, 1), (8, 3), (3, 1))) == []
    other_shard = dt.Layout(("Replicate()", "Shard(0)"), ("dp", "shard"), (2, 2), (0, 0), (8, 3), (3, 1))
    assert "the file holds the shard at mesh coordinate [*, 1], this rank holds the one at [0, 0]" in \
        base.differences(other_shard)[0]
    assert "mesh (dp=2, shard=2) saved, (dp=4) live" in base.differences(
        dt.Layout(("Shard(0)",), ("dp",), (4,), (1,), (8, 3), (3, 1)))[0]
    assert dt.Layout.from_json(base.to_json()) == base
    with pytest.raises(ValueError, match="placements for a 1-D mesh"):
        dt.Layout(("Shard(0)", "Shard(1)"), None, (2,), None, (4,), (1,))


def test_a_hostile_dtensor_node_is_an_integrity_error_naming_the_file(mesh: Any) -> None:
    raw = bytearray(encode({"w": sharded(mesh, torch.randn(4, 2))}).to_bytes())
    bad = raw.replace(b'\\"mesh_shape\\":[1]', b'\\"mesh_shape\\":-1 ')  # same length
    assert bad != raw
    with pytest.raises(IntegrityError, match=r"where\.safetensors: malformed safetensors content.*mesh_shape"):
        decode(bad, where="where.safetensors")


def test_digests_cover_the_local_shard_and_the_layout_but_not_the_coordinate(mesh: Any) -> None:
    data = torch.randn(4, 2)
    as_dtensor = digest_state({"w": sharded(mesh, data)}, "tensor")
    as_plain = digest_state({"w": data}, "tensor")
    assert as_dtensor["w"] == as_plain["w"]  # the shard's bytes, at every level
    assert as_dtensor[STRUCTURE] != as_plain[STRUCTURE]  # the layout is part of the structure
    assert digest_state({"w": sharded(mesh, data, "replicate")}, "quick")[STRUCTURE] != \
        digest_state({"w": sharded(mesh, data)}, "quick")[STRUCTURE]
    assert "coordinate" not in dt.layout_text(sharded(mesh, data))


def test_replicas_describe_a_replicated_dimension_without_their_coordinate(mesh: Any) -> None:
    assert dt.layout_of(sharded(mesh, torch.randn(4, 2), "replicate")).coordinate == (None,)
    assert dt.layout_of(sharded(mesh, torch.randn(4, 2))).coordinate == (0,)


def _fsdp2(mesh: Any, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()  # type: ignore[no-untyped-call]
    opt.step()
    return model, opt


def test_an_fsdp2_model_and_optimizer_round_trip_through_the_coordinator(mesh: Any, tmp_path: Path) -> None:
    def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return _fsdp2(mesh, seed)

    model, opt = build(0)
    comps = [StateComponent("model", model, "per_rank"), StateComponent("optimizer", opt, "per_rank")]
    CheckpointCoordinator(comps, process_groups=mesh, output_dir=tmp_path).save_checkpoint(validate=True)
    model2, opt2 = build(1)
    CheckpointCoordinator([StateComponent("model", model2, "per_rank"), StateComponent("optimizer", opt2, "per_rank")],
                          process_groups=mesh, output_dir=tmp_path).load_checkpoint()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a.to_local(), b.to_local())
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = opt.state_dict()["state"][1][key], opt2.state_dict()["state"][1][key]
        assert type(b) is dt.dtensor_type() and torch.equal(a.to_local(), b.to_local())


def test_without_dtensor_support_the_library_imports_and_refuses_subclasses(mesh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = sharded(mesh, torch.randn(2, 2))
    dt.dtensor_type.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "torch.distributed.tensor", None)
        monkeypatch.setitem(sys.modules, "torch.distributed._tensor", None)
        assert dt.dtensor_type() is None and not dt.is_dtensor(d)
        with pytest.raises(SerializationError, match="w: tensor subclass DTensor is not serializable"):
            encode({"w": d})
    finally:
        dt.dtensor_type.cache_clear()
    monkeypatch.undo()
    assert dt.is_dtensor(d)


@pytest.mark.parametrize("snapshot", [{"copy": True}, {"reuse": {}}], ids=["copy", "reused-buffers"])
def test_an_async_snapshot_of_a_dtensor_keeps_the_shard_as_it_was(mesh: Any, snapshot: dict[str, Any]) -> None:
    d = sharded(mesh, torch.randn(4, 2))
    before = d.to_local().clone()
    encoded = encode({"w": d}, **snapshot)
    with torch.no_grad():
        d.to_local().add_(1.0)  # training goes on while the snapshot is written
    out = decode(bytearray(encoded.to_bytes()))["w"]
    assert isinstance(out, dt.SavedDTensor) and torch.equal(out.local, before)
    assert out.layout == dt.layout_of(d)


def test_diff_and_export_read_dtensor_checkpoints(mesh: Any, tmp_path: Path) -> None:
    from distckpt import diff_checkpoints
    from distckpt.cli import main as cli

    paths = []
    for seed in (0, 0, 1):
        model, _ = _fsdp2(mesh, seed)
        coord = CheckpointCoordinator([StateComponent("model", model, "per_rank")], output_dir=tmp_path / str(len(paths)))
        paths.append(coord.save_checkpoint())
    assert diff_checkpoints(paths[0], paths[1]).same
    changed = diff_checkpoints(paths[0], paths[2])
    assert not changed.same and [d.key for d in changed.differences] == ["model"]
    lines = [line for f in changed.differences[0].files for line in f.entries]
    assert any(line.startswith("'0.weight': max abs difference") for line in lines), lines
    out = tmp_path / "rank0.pt"
    assert cli(["convert", "--to-torch", str(out), "--rank", "0", paths[2]]) == 0
    exported = torch.load(out, weights_only=True)["model"]
    assert type(exported["0.weight"]) is torch.Tensor and torch.equal(exported["0.weight"], model.state_dict()["0.weight"].to_local())


def test_a_checkpoint_in_the_1_2_format_still_loads_into_plain_and_a_1_3_one_says_1_3(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    path = CheckpointCoordinator([StateComponent("model", model, "global")], output_dir=tmp_path).save_checkpoint()
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert raw["format_version"] == "1.3"
    raw["format_version"] = "1.2"  # what 1.2 writers wrote: nothing else differs without DTensors
    manifest.write_text(json.dumps(raw))
    fresh = torch.nn.Linear(3, 2)
    CheckpointCoordinator([StateComponent("model", fresh, "global")], output_dir=tmp_path).load_checkpoint(path)
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_the_async_host_copy_of_dtensors_encodes_to_the_same_file_as_the_live_state(mesh: Any) -> None:
    from distckpt.hostcopy import StateCopy

    model, opt = _fsdp2(mesh, 0)
    for live in (model.state_dict(), opt.state_dict()):
        copy = StateCopy(live)
        copy.fill()
        assert bytes(encode(copy.state).to_bytes()) == bytes(encode(live).to_bytes())
    assert all(type(v) is dt.HostShard for v in StateCopy(model.state_dict()).state.values())


def test_an_fsdp2_save_staged_in_the_background_keeps_the_state_of_the_call_and_catches_an_early_step(
        mesh: Any, tmp_path: Path, held_copy: Any) -> None:
    from distckpt import StateChangedError

    gate = held_copy
    model, opt = _fsdp2(mesh, 0)
    expected = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    coord = CheckpointCoordinator([StateComponent("model", model, "per_rank"), StateComponent("optimizer", opt, "per_rank")],
                                  process_groups=mesh, output_dir=tmp_path)

    def step() -> None:
        model(torch.randn(2, 3)).sum().backward()  # type: ignore[no-untyped-call]
        opt.step()

    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True, background_staging=True)
    assert not handle.staged()  # the DTensors' shards are copied in the background too
    gate.set()
    handle.wait_staged(20)
    step()  # allowed now
    handle.result(30)
    gate.clear()
    torn = coord.save_checkpoint(checkpoint_id="2", async_save=True, background_staging=True)
    step()  # the optimizer step before wait_staged(): changes the DTensor parameters in place
    gate.set()
    with pytest.raises(StateChangedError, match=r"component 'model': entry '0\.weight'"):
        torn.result(30)
    model2, opt2 = _fsdp2(mesh, 1)
    CheckpointCoordinator([StateComponent("model", model2, "per_rank"), StateComponent("optimizer", opt2, "per_rank")],
                          process_groups=mesh, output_dir=tmp_path).load_checkpoint()
    assert all(torch.equal(model2.state_dict()[k].to_local(), v) for k, v in expected.items())
