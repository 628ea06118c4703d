"""The snapshot copy of asynchronous saves (distckpt.hostcopy, distckpt.snapshots.Snapshot):
the same files as a synchronous save, and nothing the trainer does after the return leaks in."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    ReplicationMismatchError,
    SerializationError,
    StateComponent,
)
from distckpt.hostcopy import StateCopy, Unsupported
from distckpt.snapshots import Snapshot, SnapshotBudget
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, threads


def _awkward_state() -> dict[str, Any]:
    """Every kind of tensor and container the copy handles, with aliases and shared storage."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(6, 8, generator=gen)
    shared = torch.arange(20, dtype=torch.int64)
    meta: OrderedDict[str, Any] = OrderedDict(w=torch.randn(3, 3, generator=gen))
    meta._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    cplx = torch.randn(4, dtype=torch.complex64, generator=gen)
    param = torch.nn.Parameter(torch.randn(5, generator=gen), requires_grad=False)  # one that requires grad fails a sync save (reported)
    return {
        "f32": torch.randn(7, 3, generator=gen),
        "large": torch.randn(300_000, generator=gen),  # over 1 MiB: copied in chunks by two threads
        "f64": torch.randn(4, generator=gen, dtype=torch.float64),
        "bf16": torch.randn(9, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, generator=gen).half(),
        "i8": torch.randint(-100, 100, (11,), generator=gen, dtype=torch.int8),
        "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),  # no safetensors dtype: stored raw
        "bool": torch.rand(13, generator=gen) > 0.5,
        "zero_d": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "transposed": base.t(),  # non-contiguous
        "strided": base[:, ::2],
        "alias_a": base, "alias_b": base,  # the same tensor twice
        "view_head": shared[:10], "view_tail": shared[10:],  # one storage, two views
        "same_view": (shared[:10], shared[:10]),  # two view objects of the same bytes
        "conj": cplx.conj(),  # lazily conjugated
        "neg": torch.randn(3, generator=gen, dtype=torch.complex64).conj().imag,  # negative bit set
        "param": param,
        "meta": meta,
        "nested": [1, 2.5, None, "x", b"raw", (torch.ones(2), {"k": torch.zeros(3)})],
        "ints": {1: torch.full((2,), 9.0), 2: 7},
        "np": np.arange(6, dtype=np.float32).reshape(2, 3),
        "np_scalar": np.float64(2.5),
        "dtype": torch.float16, "size": torch.Size([2, 3]),
    }


def _component_files(path: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            if name.endswith(".safetensors"):
                with open(os.path.join(root, name), "rb") as f:
                    out[os.path.relpath(os.path.join(root, name), path)] = f.read()
    return out


def test_an_async_save_writes_the_same_files_as_a_synchronous_save_for_every_kind_of_tensor(tmp_path: Path) -> None:
    box = Box(_awkward_state())
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path)
    sync = coord.save_checkpoint(checkpoint_id="sync")
    handle = coord.save_checkpoint(checkpoint_id="async", async_save=True)
    again = coord.save_checkpoint(checkpoint_id="again", async_save=True)  # into the kept buffers
    assert again.result(30)
    files = _component_files(sync)
    assert files and files == _component_files(handle.path) == _component_files(again.path)


def _mutate(state: dict[str, Any]) -> None:
    with torch.no_grad():
        for key in ("f32", "large", "bool", "zero_d", "param", "u16"):
            state[key].copy_(torch.zeros_like(state[key]) if key != "bool" else ~state[key])
        state["transposed"].mul_(-1)  # also changes alias_a, alias_b and strided: one storage
        state["view_head"].add_(100)
        state["meta"]["w"].add_(1)
        state["nested"][5][1]["k"].add_(1)
        state["conj"].imag.add_(1)
    state["np"] += 1
    state["nested"].append("late")
    state["ints"][3] = "late"
    state["meta"]._metadata[""]["version"] = 99


def test_training_right_after_an_async_save_returns_changes_nothing_in_the_checkpoint(tmp_path: Path) -> None:
    box = Box(_awkward_state())
    gate = threading.Event()

    def hook(phase: str, rank: int) -> None:
        if phase == "write" and not gate.is_set():
            gate.wait(10)  # the background writer starts only once the trainer has changed everything

    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path, phase_hook=hook)
    handle = coord.save_checkpoint(checkpoint_id="async", async_save=True)
    _mutate(box.state)
    gate.set()
    handle.result(30)
    reference = Box(_awkward_state())
    expected = CheckpointCoordinator([StateComponent("s", reference, "global")],
                                     output_dir=tmp_path / "ref").save_checkpoint(checkpoint_id="ref")
    assert _component_files(handle.path) == _component_files(expected)


def test_a_copy_keeps_one_tensor_per_aliased_view_and_separates_distinct_views() -> None:
    state = _awkward_state()
    copy = StateCopy(state)
    copy.fill()
    got = copy.state
    assert got["alias_a"] is got["alias_b"] and got["same_view"][0] is got["same_view"][1]
    assert got["view_head"].data_ptr() != state["view_head"].data_ptr()
    assert got["transposed"].is_contiguous() and torch.equal(got["transposed"], state["transposed"])
    assert torch.equal(got["conj"], state["conj"].resolve_conj()) and not got["conj"].is_conj()
    assert torch.equal(got["neg"], state["neg"].resolve_neg()) and not got["neg"].is_neg()
    assert type(got["meta"]) is OrderedDict and got["meta"]._metadata == {"": {"version": 2}}
    assert got["meta"]._metadata is not state["meta"]._metadata
    assert type(got["param"]) is torch.Tensor and not got["param"].requires_grad
    assert got["np"] is not state["np"] and np.array_equal(got["np"], state["np"])
    assert isinstance(got["nested"][5], tuple) and got["ints"][2] == 7


def test_kept_buffers_are_reused_only_where_shape_and_dtype_still_match() -> None:
    reuse: dict[int, torch.Tensor] = {}
    first = StateCopy({"a": torch.ones(4), "b": torch.ones(2, 2), "c": torch.ones(3)}, reuse)
    first.fill()
    state = {"a": torch.full((4,), 2.0), "b": torch.full((4,), 3.0), "c": torch.full((3,), 4, dtype=torch.int32)}
    second = StateCopy(state, reuse)
    second.fill()
    assert second.state["a"] is first.state["a"]  # same shape and dtype: the same host memory
    assert second.state["b"] is not first.state["b"] and second.state["c"] is not first.state["c"]
    assert all(torch.equal(second.state[k], v) for k, v in state.items())
    assert second.state["c"].dtype == torch.int32 and second.state["b"].shape == (4,)


@pytest.mark.parametrize("state", [{"x": object()}, {"x": {(1, 2): torch.ones(1)}}, {"x": torch.ones(2).to_sparse()},
                                   {"x": torch.empty(2, device="meta")}, {"x": np.array([object()])}])
def test_a_state_the_copy_does_not_know_is_refused_as_unsupported(state: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        StateCopy(state)


def test_an_async_save_of_an_unsupported_state_fails_through_the_handle_naming_the_path(tmp_path: Path) -> None:
    coord = CheckpointCoordinator([StateComponent("s", Box({"ok": torch.ones(2), "bad": {"deep": object()}}),
                                                  "global")], output_dir=tmp_path)
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    with pytest.raises(SerializationError, match=r"bad\.deep"):
        handle.result(30)
    assert not os.path.exists(handle.path)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_a_balanced_async_save_copies_only_each_writers_part_and_keeps_the_state_at_save_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    held: dict[int, int] = {}
    init = Snapshot.__init__

    def spy(self: Snapshot, copies: Any, *args: Any) -> None:
        init(self, copies, *args)
        held[threading.get_ident()] = self.nbytes

    monkeypatch.setattr(Snapshot, "__init__", spy)
    chunk = 64 * 1024  # bytes per tensor; 8 tensors, parts of at least 2 tensors

    def state() -> dict[str, torch.Tensor]:
        if layout == "transposed":  # not laid out as written: part 0's writer copies, not hashes, the others
            return {f"t{i}": torch.arange(chunk // 4, dtype=torch.float32).reshape(128, -1).t() + i for i in range(8)}
        return {f"t{i}": torch.arange(chunk // 4, dtype=torch.float32) + i for i in range(8)}

    def fn(comm: ThreadComm) -> tuple[int, str]:
        box = Box(state())
        gate = threading.Event()
        coord = CheckpointCoordinator([StateComponent("s", box, "replicated")], dist=comm, output_dir=tmp_path,
                                      min_part_bytes=2 * chunk,
                                      phase_hook=lambda phase, rank: gate.wait(10) if phase == "write" else None)
        handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
        for t in box.state.values():
            t.add_(1000.0)  # training goes on before any byte is written
        gate.set()
        return held[threading.get_ident()], handle.result(30)

    results = all_ok(threads(4, fn))
    total = 8 * chunk
    if layout == "contiguous":  # every writer copies its own part only (part 0's hashes the others)
        assert all(0 < nbytes < total for nbytes, _ in results)
    else:
        assert results[0][0] == total and all(0 < nbytes < total for nbytes, _ in results[1:])
    restored = Box({k: torch.zeros_like(v) for k, v in state().items()})
    CheckpointCoordinator([StateComponent("s", restored, "replicated")], output_dir=tmp_path,
                          min_part_bytes=2 * chunk).load_checkpoint(results[0][1])
    assert all(torch.equal(restored.state[k], v) for k, v in state().items())


def test_replicas_that_differ_fail_a_balanced_async_save_on_every_rank(tmp_path: Path) -> None:
    chunk = 64 * 1024

    def fn(comm: ThreadComm) -> str:
        state = {f"t{i}": torch.full((chunk // 4,), float(i + (comm.rank == 2))) for i in range(8)}
        coord = CheckpointCoordinator([StateComponent("s", Box(state), "replicated")], dist=comm,
                                      output_dir=tmp_path, min_part_bytes=2 * chunk)
        handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
        try:
            handle.result(30)
        except ReplicationMismatchError as exc:
            return f"{sorted(exc.failures)}"
        return "committed"

    outcome = all_ok(threads(4, fn))
    assert len(set(outcome)) == 1 and outcome[0] != "committed" and "2" in outcome[0]
    assert not os.path.exists(tmp_path / "checkpoints" / "checkpoint-1")


def test_a_part_writer_refuses_to_write_bytes_its_snapshot_did_not_copy() -> None:
    from distckpt.codec import encode

    copy = StateCopy({"a": torch.ones(4), "b": torch.ones(4)})
    copy.allocate()
    only = {copy.state["a"].data_ptr()}
    snap = Snapshot({"s": copy}, {"s": only}, {"s": 1}, None)
    snap.pump()
    whole = encode(snap.state("s"))
    produce = snap.produce(lambda: iter([("s", "s/0.safetensors", whole, "", ())]))
    with pytest.raises(RuntimeError, match="did not copy"):
        list(produce())


def test_a_streamed_async_save_never_holds_more_than_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budgets: list[SnapshotBudget] = []
    make = SnapshotBudget.__init__

    def spy(self: SnapshotBudget, limit: int) -> None:
        make(self, limit)
        budgets.append(self)

    monkeypatch.setattr(SnapshotBudget, "__init__", spy)
    boxes = {k: Box({"w": torch.full((64 * 1024,), float(i)), "v": torch.full((1024,), -float(i))})
             for i, k in enumerate("abcd")}
    coord = CheckpointCoordinator([StateComponent(k, b, "global") for k, b in boxes.items()], output_dir=tmp_path,
                                  async_snapshot_bytes=300 * 1024)
    coord.save_checkpoint(checkpoint_id="0", async_save=True).result(30)  # buffers none: streamed from the start
    handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
    for b in boxes.values():
        b.state["w"].add_(1.0)
    handle.result(30)
    assert len(budgets) == 2 and all(0 < b.peak <= 300 * 1024 for b in budgets)
    assert all(b.waits for b in budgets)  # four copies of 260 KiB: each waited for the previous one's write
    restored = {k: Box({"w": torch.zeros(64 * 1024), "v": torch.zeros(1024)}) for k in boxes}
    CheckpointCoordinator([StateComponent(k, b, "global") for k, b in restored.items()],
                          output_dir=tmp_path).load_checkpoint(handle.path)
    assert all(torch.equal(restored[k].state["w"], torch.full((64 * 1024,), float(i)))
               for i, k in enumerate(boxes))


def test_a_snapshot_error_reaches_every_rank_through_the_handle(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    fill = StateCopy.fill

    def broken(self: StateCopy, only: Any = None) -> None:
        if threading.current_thread().name.endswith("1"):
            raise MemoryError("no host memory for the snapshot")
        fill(self, only)

    monkeypatch.setattr(StateCopy, "fill", broken)

    def fn(comm: ThreadComm) -> str:
        threading.current_thread().name = f"rank-{comm.rank}"
        coord = CheckpointCoordinator([StateComponent("s", Box({"w": torch.ones(4) * comm.rank}), "per_rank")],
                                      dist=comm, output_dir=tmp_path)
        handle = coord.save_checkpoint(checkpoint_id="1", async_save=True)
        try:
            handle.result(30)
        except Exception as exc:
            return f"{type(exc).__name__}: {sorted(getattr(exc, 'failures', {}))}"
        return "committed"

    assert all_ok(threads(2, fn)) == ["CrossRankError: [1]"] * 2
    assert not os.path.exists(tmp_path / "checkpoints" / "checkpoint-1")


def test_large_tensors_copied_in_chunks_by_two_threads_arrive_whole(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import distckpt.hostcopy as hostcopy

    monkeypatch.setattr(hostcopy, "_LARGE", 1024)
    monkeypatch.setattr(hostcopy, "_CHUNK", 4096 + 8)  # chunks that end mid-element and mid-tensor
    gen = torch.Generator().manual_seed(3)
    state = {f"t{i}": torch.randn(1000 + 777 * i, generator=gen, dtype=torch.float64 if i % 2 else torch.float32)
             for i in range(12)}
    state["small"] = torch.arange(10)
    copy = StateCopy(state)
    copy.fill()
    assert all(torch.equal(copy.state[k], v) and copy.state[k].data_ptr() != v.data_ptr() for k, v in state.items())
    box = Box(state)
    coord = CheckpointCoordinator([StateComponent("s", box, "global")], output_dir=tmp_path)
    sync = coord.save_checkpoint(checkpoint_id="sync")
    handle = coord.save_checkpoint(checkpoint_id="async", async_save=True)
    for t in state.values():
        t.add_(1)
    handle.result(30)
    assert _component_files(handle.path) == _component_files(sync)


def test_an_interrupt_while_streaming_the_snapshot_releases_the_writer() -> None:
    first, second = StateCopy({"w": torch.ones(4)}), StateCopy({"w": torch.ones(4)})

    def interrupted(only: Any = None) -> None:
        raise KeyboardInterrupt

    second.fill = interrupted  # type: ignore[method-assign]
    snap = Snapshot({"a": first, "b": second}, {"a": None, "b": None}, {"a": 1, "b": 1}, SnapshotBudget(1 << 20))
    outcome: list[str] = []

    def writer() -> None:
        try:
            snap.state("a")
            snap.state("b")
            outcome.append("read both")
        except KeyboardInterrupt:
            outcome.append("interrupted")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        snap.pump()
    thread.join(10)
    assert outcome == ["interrupted"]
