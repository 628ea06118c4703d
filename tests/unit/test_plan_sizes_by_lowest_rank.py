"""Balanced writes are sized by each replica set's lowest rank alone, in the plan's second round.

Only ``sizes[lowest rank]`` decides how a set is split (:func:`distckpt.layout.part_writers`),
so the other members never ask their ``Stateful`` for its state, nor walk it, to plan a save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distckpt import CheckpointCoordinator, CheckpointManifest, StateComponent
from distckpt.layout import plan_component
from distckpt.planning import leader_part_counts, part_counts, plan_components, split_components
from distckpt.testing import ThreadComm
from distckpt.topology import Topology
from tests.helpers import Box, CountingBox, all_ok, threads


def model_state() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.arange(250, dtype=torch.float32) + i for i in range(8)}  # 8,000 bytes


def save_counting(tmp_path: Path, pattern: str, min_part_bytes: int, groups: Any = None) -> tuple[list[int], str]:
    boxes: dict[int, CountingBox] = {}

    def save(comm: ThreadComm) -> str:
        box = boxes[comm.rank] = CountingBox(model_state())
        comp = StateComponent("model", box, pattern, process_group_name="dp" if groups else None)
        coord = CheckpointCoordinator([comp], dist=comm, output_dir=tmp_path, min_part_bytes=min_part_bytes,
                                      process_groups={"dp": groups(comm.rank)} if groups else None)
        return coord.save_checkpoint()

    paths = all_ok(threads(4, save, nodes=[0, 0, 1, 1]))
    return [boxes[r].calls for r in range(4)], paths[0]


def test_a_replicated_state_too_small_to_split_is_asked_of_rank_0_only(tmp_path: Path) -> None:
    calls, path = save_counting(tmp_path, "replicated", min_part_bytes=1 << 20)
    assert calls == [1, 0, 0, 0]  # rank 0 sizes it and writes it; no other rank plans with it
    files = CheckpointManifest.load(path).components["model"].files
    assert [(f.path, f.writer) for f in files] == [("model/replicated.safetensors", 0)]


def test_per_group_sets_are_sized_by_their_lowest_rank_and_split_across_nodes(tmp_path: Path) -> None:
    calls, path = save_counting(tmp_path, "per_group", min_part_bytes=3_000,
                                groups=lambda rank: (0, 2) if rank % 2 == 0 else (1, 3))
    assert calls == [1, 1, 1, 1]  # ranks 0 and 1 size and write part 0, ranks 2 and 3 write part 1
    files = CheckpointManifest.load(path).components["model"].files
    assert sorted((f.writer, f.part, f.parts) for f in files) == [(0, 0, 2), (1, 0, 2), (2, 1, 2), (3, 1, 2)]

    def load(comm: ThreadComm) -> None:
        box = Box({k: torch.zeros_like(v) for k, v in model_state().items()})
        comp = StateComponent("model", box, "per_group", process_group_name="dp")
        CheckpointCoordinator([comp], dist=comm, output_dir=tmp_path,
                              process_groups={"dp": (0, 2) if comm.rank % 2 == 0 else (1, 3)}).load_checkpoint(path)
        assert all(torch.equal(box.state[k], v) for k, v in model_state().items())

    all_ok(threads(4, load, nodes=[0, 0, 1, 1]))


def test_a_failing_state_dict_on_a_lowest_rank_fails_the_plan_on_every_rank(tmp_path: Path) -> None:
    class Broken(Box):
        def state_dict(self) -> Any:
            raise RuntimeError("no state here")

    def save(comm: ThreadComm) -> str:
        box = Broken() if comm.rank == 0 else Box(model_state())
        return CheckpointCoordinator([StateComponent("model", box, "replicated")], dist=comm,
                                     output_dir=tmp_path, min_part_bytes=1_000).save_checkpoint()

    results = threads(4, save)
    assert all(isinstance(r, Exception) and "no state here" in str(r) for r in results)
    assert all(getattr(r, "phase", None) == "plan" for r in results)


MESHES = st.sampled_from([(1, 4), (2, 2), (4, 1), (2, 4), (4, 2), (3, 2)])  # (nodes, ranks per node)


@settings(max_examples=40, deadline=None)
@given(mesh=MESHES, pattern=st.sampled_from(["replicated", "per_node", "per_group", "per_rank"]),
       sizes=st.lists(st.integers(0, 40_000), min_size=8, max_size=8), unit=st.sampled_from([1_000, 7_000]))
def test_splitting_from_the_lowest_ranks_counts_plans_what_every_rank_sending_its_size_did(
        mesh: tuple[int, int], pattern: str, sizes: list[int], unit: int) -> None:
    nodes, per_node = mesh
    world = nodes * per_node
    groups = [{"dp": tuple(r for r in range(world) if r % per_node == rank % per_node)} for rank in range(world)]
    topology = Topology.from_reports([f"n{r // per_node}" for r in range(world)], groups)
    comps = [StateComponent("model", Box({}), pattern, process_group_name="dp" if pattern == "per_group" else None)]
    # The plan of old: every rank sent its part count, the lowest rank's decided.
    every = {r: part_counts(sizes[r], unit, world) * unit for r in range(world)}
    before = {"model": plan_component(topology, "model", comps[0].pattern, sizes=every, min_part_bytes=unit)}
    wholes = plan_components(topology, comps)
    sent = [leader_part_counts(r, world, comps, wholes, lambda key, r=r: sizes[r], unit) for r in range(world)]
    assert split_components(topology, comps, wholes, sent, unit) == before
    leaders = {f.ranks[0] for f in wholes["model"].files}
    assert all(not sent[r] for r in range(world) if r not in leaders)  # the others send nothing


def test_leader_part_counts_sizes_only_where_the_rank_is_lowest_and_replicas_are_identical() -> None:
    topology = Topology.from_reports(["n0"] * 4, [{} for _ in range(4)])
    comps = [StateComponent("a", Box({}), "replicated"), StateComponent("b", Box({}), "per_rank")]
    wholes = plan_components(topology, comps)
    asked: list[tuple[int, str]] = []

    def size_of(rank: int) -> Any:
        return lambda key: asked.append((rank, key)) or 5_000

    assert leader_part_counts(0, 4, comps, wholes, size_of(0), 1_000) == bytes([4, 0])  # capped at the world
    assert leader_part_counts(1, 4, comps, wholes, size_of(1), 1_000) == b""
    assert asked == [(0, "a")]


@pytest.mark.parametrize("world", [1, 2])
def test_a_world_of_one_or_two_never_sizes_a_state_it_does_not_write(tmp_path: Path, world: int) -> None:
    boxes: dict[int, CountingBox] = {}

    def save(comm: ThreadComm) -> str:
        box = boxes[comm.rank] = CountingBox(model_state())
        return CheckpointCoordinator([StateComponent("model", box, "replicated")], dist=comm,
                                     output_dir=tmp_path).save_checkpoint()

    all_ok(threads(world, save))
    assert [boxes[r].calls for r in range(world)] == [1] + [0] * (world - 1)


@pytest.mark.parametrize("background", [False, True])
def test_an_asynchronous_save_sizes_from_the_walk_it_snapshots_and_plans_the_parts_a_synchronous_one_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, background: bool) -> None:
    from distckpt import asyncsave, saving
    from distckpt.hostcopy import StateCopy

    walked: list[int] = []

    class CountingCopy(StateCopy):
        def __init__(self, state: Any, *args: Any, **kwargs: Any) -> None:
            walked.append(id(state))
            super().__init__(state, *args, **kwargs)

    monkeypatch.setattr(asyncsave, "StateCopy", CountingCopy)
    sized: list[int] = []
    original = saving.state_nbytes
    for module in (saving, asyncsave):  # wherever a size could come from other than the walk
        monkeypatch.setattr(module, "state_nbytes", lambda state: sized.append(1) or original(state))
    sized_by_sync: list[int] = []

    def save(comm: ThreadComm) -> tuple[str, str]:
        box = Box(model_state())
        coord = CheckpointCoordinator([StateComponent("model", box, "replicated")], dist=comm,
                                      output_dir=tmp_path, min_part_bytes=3_000)
        synced = coord.save_checkpoint(checkpoint_id="sync")
        sized_by_sync.append(len(sized))
        handle = coord.save_checkpoint(checkpoint_id="async", async_save=True, background_staging=background)
        return synced, handle.result()

    (synced, asynced), *_ = all_ok(threads(2, save))
    assert sized_by_sync == [1, 1] and len(sized) == 1  # the synchronous save's rank 0 only
    sync_files, async_files = (CheckpointManifest.load(p).components["model"].files for p in (synced, asynced))
    assert [(f.writer, f.part, f.parts) for f in async_files] == [(f.writer, f.part, f.parts) for f in sync_files]
    assert [(f.writer, f.part, f.parts) for f in async_files] == [(0, 0, 2), (1, 1, 2)]
    assert len(walked) == 2  # one walk per rank: rank 0's serves both its size and its snapshot


def test_coordinators_disagreeing_on_min_part_bytes_fail_the_plan_on_every_rank_naming_it(tmp_path: Path) -> None:
    from distckpt import ArgumentMismatchError

    def save(comm: ThreadComm) -> str:
        return CheckpointCoordinator([StateComponent("model", Box(model_state()), "replicated")], dist=comm,
                                     output_dir=tmp_path, min_part_bytes=1_000 if comm.rank == 0 else None
                                     ).save_checkpoint()

    results = threads(3, save)
    assert all(isinstance(r, ArgumentMismatchError) and r.phase == "plan" for r in results), results
    assert all("min_part_bytes" in str(r) and set(r.failures) == {0} for r in results)
    assert not list((tmp_path / "checkpoints").glob("*"))  # nothing written, staging removed


def test_an_async_save_splits_a_state_with_tensors_in_ordereddict_metadata_as_a_sync_save_does(
        tmp_path: Path) -> None:
    from collections import OrderedDict

    def state() -> OrderedDict[str, Any]:
        od: OrderedDict[str, Any] = OrderedDict(w=torch.ones(100))
        od._metadata = {"big": torch.zeros(1000)}  # type: ignore[attr-defined]  # 4,000 bytes state_nbytes skips
        return od

    def save(comm: ThreadComm) -> tuple[str, str]:
        coord = CheckpointCoordinator([StateComponent("m", Box(state()), "replicated")], dist=comm,
                                      output_dir=tmp_path, min_part_bytes=2_000)
        return coord.save_checkpoint(checkpoint_id="sync"), coord.save_checkpoint(
            checkpoint_id="async", async_save=True).result()

    (synced, asynced), *_ = all_ok(threads(2, save))
    files = [[(f.path.split("/")[-1], f.writer) for f in CheckpointManifest.load(p).components["m"].files]
             for p in (synced, asynced)]
    assert files[0] == files[1] == [("replicated.safetensors", 0)]
