"""Balanced writes: a large replica set is written as parts by several members, node by node."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointManifest,
    ManifestError,
    ReplicationMismatchError,
    SharingPattern,
    StateComponent,
    codec,
)
from distckpt.cli import main as cli_main
from distckpt.layout import part_writers
from distckpt.testing import ThreadComm
from distckpt.topology import Topology
from tests.helpers import Box, all_ok, threads

NODES = [0, 0, 1, 1]  # 2 nodes x 2 ranks
PART = 10_000  # model_state() holds 23,664 tensor bytes: two parts


def model_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(40 + i, 17, generator=g) for i in range(8)} | {"step": 12}


def coordinator(comm: ThreadComm, out: Path, comps: list[StateComponent], **kw: Any) -> CheckpointCoordinator:
    return CheckpointCoordinator(comps, dist=comm, output_dir=out, min_part_bytes=kw.pop("min_part_bytes", PART),
                                 **kw)


def topology(nodes: list[int]) -> Topology:
    return Topology.from_reports([f"n{n}" for n in nodes], [{} for _ in nodes])


def test_part_writers_go_node_by_node_and_no_part_is_smaller_than_the_minimum() -> None:
    topo = topology([0, 0, 1, 1, 2, 2, 3, 3])
    members = tuple(range(8))
    assert part_writers(topo, members, 10 * PART, PART) == (0, 2, 4, 6, 1, 3, 5, 7)
    assert part_writers(topo, members, 5 * PART, PART) == (0, 2, 4, 6, 1)
    assert part_writers(topo, members, 3 * PART + 5, PART) == (0, 2, 4)
    assert part_writers(topo, members, 2 * PART - 1, PART) == (0,)
    assert part_writers(topo, (1, 0, 4), 10 * PART, PART) == (0, 4, 1)  # ranks 0 and 1 share node 0
    assert part_writers(topology([0] * 4), (0, 1, 2, 3), 100 * PART, PART) == (0, 1, 2, 3)  # one node too


@pytest.mark.parametrize("parts", [1, 2, 3, 5, 12])
def test_split_parts_are_self_contained_files_that_assemble_to_the_state(parts: int) -> None:
    state = {"big": torch.randn(1000), "small": [torch.arange(3), torch.ones(2, 2, dtype=torch.bfloat16)],
             "c": torch.randn(4, dtype=torch.complex128), "meta": ("x", 1.5)}
    pieces = codec.encode(state).split(parts)
    assert len(pieces) == parts
    layouts = []
    for piece in pieces:
        data = bytearray(piece.to_bytes())
        layouts.append((codec.parse_header(memoryview(data), len(data)), data))
    assert [lay.part for lay, _ in layouts] == ([None] if parts == 1 else [f"{i}/{parts}" for i in range(parts)])
    back = codec.assemble(layouts)
    assert torch.equal(back["big"], state["big"]) and torch.equal(back["small"][1], state["small"][1])
    assert torch.equal(back["c"], state["c"]) and back["meta"] == ("x", 1.5)


def test_a_large_replicated_state_on_two_nodes_is_written_in_parts_by_each_nodes_first_rank(tmp_path: Path) -> None:
    saved = model_state()

    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box(model_state()), "replicated")]).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    files = CheckpointManifest.load(path).components["model"].files
    assert [(f.path, f.writer, f.part, f.parts, f.ranks) for f in files] == [
        ("model/replicated.part-000-of-002.safetensors", 0, 0, 2, (0, 1, 2, 3)),
        ("model/replicated.part-001-of-002.safetensors", 2, 1, 2, (0, 1, 2, 3)),
    ]
    assert sorted(os.listdir(Path(path) / "model")) == [os.path.basename(f.path) for f in files]
    raw = json.loads((Path(path) / "manifest.json").read_text())
    assert raw["format_version"] == "1.3" and raw["components"]["model"]["files"][1]["part"] == [1, 2]

    def load(comm: ThreadComm) -> dict[str, Any]:
        box = Box({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in saved.items()})
        coordinator(comm, tmp_path, [StateComponent("model", box, "replicated")]).load_checkpoint()
        return box.state

    for state in all_ok(threads(4, load, nodes=NODES)) + all_ok(threads(1, load)):  # and elastically, world 1
        assert state["step"] == 12 and all(torch.equal(state[k], saved[k]) for k in saved if k != "step")


def test_per_group_sets_are_balanced_per_set(tmp_path: Path) -> None:
    groups = [{"dp": (0, 2)}, {"dp": (1, 3)}, {"dp": (0, 2)}, {"dp": (1, 3)}]

    def comps(rank: int) -> list[StateComponent]:
        return [StateComponent("model", Box(model_state(seed=rank % 2)), SharingPattern.PER_GROUP,
                               process_group_name="dp")]

    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, comps(comm.rank), process_groups=groups[comm.rank]).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    comp = CheckpointManifest.load(path).components["model"]
    assert [(f.writer, f.part) for f in comp.files] == [(0, 0), (2, 1), (1, 0), (3, 1)]
    assert comp.replicated_across == ((0, 2), (1, 3)) and comp.ranks == (0, 1, 2, 3)

    def load(comm: ThreadComm) -> bool:
        box = Box({k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in model_state().items()})
        c = [StateComponent("model", box, SharingPattern.PER_GROUP, process_group_name="dp")]
        coordinator(comm, tmp_path, c, process_groups=groups[comm.rank]).load_checkpoint()
        want = model_state(seed=comm.rank % 2)
        return all(torch.equal(box.state[k], want[k]) for k in want if k != "step")

    assert all_ok(threads(4, load, nodes=NODES)) == [True] * 4


def test_small_states_are_never_split_and_one_node_splits_among_its_ranks(tmp_path: Path) -> None:
    def save(comm: ThreadComm, nodes_note: str) -> str:
        comps = [StateComponent("model", Box(model_state()), "replicated"),
                 StateComponent("tiny", Box({"x": torch.ones(3)}), "replicated")]
        return coordinator(comm, tmp_path, comps).save_checkpoint(checkpoint_id=nodes_note)

    one_node = all_ok(threads(4, lambda c: save(c, "one-node")))[0]
    two_nodes = all_ok(threads(4, lambda c: save(c, "two-nodes"), nodes=NODES))[0]
    assert [(f.writer, f.part) for f in CheckpointManifest.load(one_node).components["model"].files] == [
        (0, 0), (1, 1)]
    assert [f.parts for f in CheckpointManifest.load(two_nodes).components["tiny"].files] == [1]


def test_min_part_bytes_none_turns_balanced_writes_off(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box(model_state()), "replicated")],
                           min_part_bytes=None).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    assert len(CheckpointManifest.load(path).components["model"].files) == 1
    with pytest.raises(ValueError, match="min_part_bytes"):
        CheckpointCoordinator([], min_part_bytes=0)


def test_replicas_with_different_structure_fail_a_balanced_save_on_every_rank(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        state = model_state()
        if comm.rank == 2:
            state["extra"] = torch.ones(2)
        return coordinator(comm, tmp_path, [StateComponent("model", Box(state), "replicated")]).save_checkpoint()

    results = threads(4, save, nodes=NODES)
    assert all(isinstance(r, ReplicationMismatchError) for r in results), results
    assert all(r.failures.keys() == {2} and r.phase == "write" for r in results)
    assert os.listdir(tmp_path / "checkpoints") == []


def test_a_damaged_part_fails_the_load_naming_that_part(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box(model_state()), "replicated")]).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    victim = Path(path) / "model" / "replicated.part-001-of-002.safetensors"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 1
    victim.write_bytes(bytes(data))

    def load(comm: ThreadComm) -> None:
        coordinator(comm, tmp_path, [StateComponent("model", Box(model_state(5)), "replicated")]).load_checkpoint()

    results = threads(4, load, nodes=NODES)
    assert all("replicated.part-001-of-002.safetensors: checksum mismatch" in str(r) for r in results), results


def test_a_manifest_with_an_incomplete_set_of_parts_is_refused(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box(model_state()), "replicated")]).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    raw = json.loads((Path(path) / "manifest.json").read_text())
    del raw["components"]["model"]["files"][1]
    with pytest.raises(ManifestError, match=r"expected one file, or parts 0\.\.n-1 of n"):
        CheckpointManifest.from_dict(raw)


def test_the_cli_verifies_and_diffs_balanced_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def save(comm: ThreadComm, seed: int, cid: str) -> str:
        return coordinator(comm, tmp_path, [StateComponent("model", Box(model_state(seed)), "replicated")]
                           ).save_checkpoint(checkpoint_id=cid)

    a = all_ok(threads(4, lambda c: save(c, 0, "a"), nodes=NODES))[0]
    b = all_ok(threads(4, lambda c: save(c, 1, "b"), nodes=NODES))[0]
    assert cli_main(["verify", a]) == 0
    capsys.readouterr()
    assert cli_main(["diff", a, a]) == 0
    assert cli_main(["diff", a, b]) != 0
    out = capsys.readouterr().out
    assert "replicated.part-000-of-002.safetensors" in out and "layer0.weight" in out


def test_a_state_without_tensor_bytes_splits_into_an_empty_tail_that_still_assembles() -> None:
    state = {"empty": torch.zeros(0), "n": 3}
    pieces = codec.encode(state).split(3)
    parsed = []
    for piece in pieces:
        data = bytearray(piece.to_bytes())
        parsed.append((codec.parse_header(memoryview(data), len(data)), data))
    assert [len(layout.entries) for layout, _ in parsed] == [1, 0, 0]
    back = codec.assemble(parsed)
    assert back["n"] == 3 and back["empty"].shape == (0,)
    assert part_writers(topology([0, 1, 2]), (0, 1, 2), 0, PART) == (0,)  # and such a state is never split
