"""Direct writes (``direct_io=True``, ``O_DIRECT``): the same files and checksums as ordinary writes.

The writer then hands the kernel whole aligned buffers only, pads the last and
cuts the file back; where the file system refuses ``O_DIRECT`` (at open or at
the first write) it writes as usual. These tests compare bytes, never timings.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distckpt import CheckpointCoordinator, StateComponent, storage
from distckpt.hashing import checksum_of
from distckpt.storage import posix, writer
from tests.helpers import Box

O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere nothing asks for it


@pytest.fixture
def small_buffers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Bounce buffers of 16 KiB (4 alignment units), so that runs and views straddle them often."""
    monkeypatch.setattr(writer, "_BOUNCE_BYTES", 16 * 1024)
    writer._bounce_local.__dict__.pop("ring", None)  # this thread's buffers were made at the old size
    yield
    writer._bounce_local.__dict__.pop("ring", None)


def _runs(spec: list[tuple[str, int, int]]) -> list[Any]:
    """``spec`` items: (kind, size, seed): a view of ``size`` bytes (``owned`` or not), or a run of
    ``size`` small float32 / int16 tensors (at most one bounce buffer together, as the writer asks)."""
    out: list[Any] = []
    for kind, size, seed in spec:
        g = torch.Generator().manual_seed(seed)
        if kind in ("owned", "view"):
            data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
            out.append((memoryview(data.numpy()), kind == "owned"))
        else:
            dtype = torch.float32 if kind == "f32" else torch.int16
            tensors = [torch.randint(-99, 99, (1 + (seed + i) % 300,), generator=g).to(dtype) for i in range(size)]
            out.append((tensors, sum(t.nbytes for t in tensors)))
    return out


def _expected(runs: list[Any]) -> bytes:
    parts = []
    for item, _owned in runs:
        if isinstance(item, list):
            parts += [bytes(t.numpy().tobytes()) for t in item]
        else:
            parts.append(bytes(item))
    return b"".join(parts)


ITEMS = st.lists(st.tuples(st.sampled_from(["owned", "view", "f32", "i16"]), st.integers(0, 40_000),
                           st.integers(0, 1000)).map(lambda t: (t[0], t[1] if t[0] in ("owned", "view") else t[1] % 12 + 1,
                                                               t[2])), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=ITEMS)
def test_a_direct_write_holds_the_same_bytes_size_and_checksum_as_an_ordinary_one(
        tmp_path_factory: pytest.TempPathFactory, small_buffers: None, spec: list[tuple[str, int, int]]) -> None:
    # the buffers stay 16 KiB for every example (the fixture is not reset between them, nor needs to be)
    folder = tmp_path_factory.mktemp("direct")
    runs = _runs(spec)
    expected = _expected(runs)
    plain = storage.write_runs(str(folder / "plain"), iter(runs))
    direct = storage.write_runs(str(folder / "direct"), iter(runs), direct=True)
    assert plain == direct == (len(expected), checksum_of(expected))
    assert (folder / "direct").read_bytes() == expected


def test_a_run_straddling_two_buffers_may_hold_a_one_element_tensor_of_any_stride(
        tmp_path: Path, small_buffers: None) -> None:
    odd = torch.tensor([1.5, 2.5])[::2]  # contiguous (one element), stride 2: no byte view of it as it is
    assert odd.is_contiguous() and odd.stride() == (2,)
    runs = [(memoryview(bytes(16 * 1024 - 2)), True), ([torch.ones(3), odd], 16)]
    expected = bytes(16 * 1024 - 2) + torch.ones(3).numpy().tobytes() + odd.clone().numpy().tobytes()
    for name, direct in (("plain", False), ("direct", True)):
        assert storage.write_runs(str(tmp_path / name), iter(runs), direct=direct) == (len(expected), checksum_of(expected))
        assert (tmp_path / name).read_bytes() == expected


def test_a_data_file_is_opened_with_o_direct_where_the_file_system_allows_it(tmp_path: Path) -> None:
    fd, direct = posix.create_data_file(str(tmp_path / "f"), direct=True)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    finally:
        os.close(fd)
    if not direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert flags & os.O_DIRECT
    fd, direct = posix.create_data_file(str(tmp_path / "g"))
    try:
        assert not direct and not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)


def test_a_file_system_that_refuses_o_direct_at_open_gets_an_ordinary_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refusing(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & O_DIRECT:
            os.close(real_open(path, flags & ~O_DIRECT, mode))  # as older tmpfs may: created, then refused
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(posix.os, "open", refusing)
    data = bytes(range(256)) * 77
    size, checksum = storage.write_runs(str(tmp_path / "f"), iter([(memoryview(data), False)]), direct=True)
    assert (size, checksum) == (len(data), checksum_of(data)) and (tmp_path / "f").read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_a_file_system_that_refuses_the_first_direct_write_gets_ordinary_writes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: None) -> None:
    real = writer._writev_all
    refused: list[int] = []
    stopped: list[int] = []
    real_stop = posix.stop_direct

    def once(fd: int, views: list[memoryview]) -> None:
        if not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, views)

    monkeypatch.setattr(writer, "_writev_all", once)
    monkeypatch.setattr(posix, "stop_direct", lambda fd: stopped.append(fd) or real_stop(fd))
    data = os.urandom(50_001)  # several buffers, the last one short
    size, checksum = storage.write_runs(str(tmp_path / "f"), iter([(memoryview(data), False)]), direct=True)
    assert (size, checksum) == (len(data), checksum_of(data)) and (tmp_path / "f").read_bytes() == data
    assert refused and stopped == refused


def test_a_direct_write_that_fails_later_removes_its_file_and_raises(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_buffers: None) -> None:
    real = writer._writev_all
    calls: list[int] = []

    def second_fails(fd: int, views: list[memoryview]) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, views)

    monkeypatch.setattr(writer, "_writev_all", second_fails)
    with pytest.raises(OSError) as info:
        storage.write_runs(str(tmp_path / "f"), iter([(memoryview(os.urandom(60_000)), False)]), direct=True)
    assert info.value.errno == errno.ENOSPC and not (tmp_path / "f").exists()


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300_001, generator=g), "b": torch.randn(17, generator=g),
            "small": [torch.randint(0, 9, (n,), generator=g) for n in range(1, 40)], "step": 7}


@pytest.mark.parametrize("async_save", [False, True])
def test_a_coordinator_with_direct_io_saves_the_same_files_and_loads_them_bit_exact(
        tmp_path: Path, async_save: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, bool]] = []
    real = posix.create_data_file
    monkeypatch.setattr(posix, "create_data_file", lambda path, direct=False: asked.append((path, direct)) or real(path, direct))
    box = Box(_state(1))
    for name, direct in (("plain", False), ("direct", True)):
        coord = CheckpointCoordinator([StateComponent("model", box, "replicated")], output_dir=tmp_path / name,
                                      direct_io=direct)
        coord.save_checkpoint(checkpoint_id="1", async_save=async_save)
        coord.wait()
    data_files = {(os.path.relpath(p, tmp_path).split(os.sep)[0], d) for p, d in asked if p.endswith(".safetensors")}
    assert data_files == {("plain", False), ("direct", True)}  # the manifest is a small file: written as usual
    files = {p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*.safetensors")}
    assert files
    for rel in files:
        assert (tmp_path / "direct" / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes()
    box.state = _state(2)
    coord.load_checkpoint(str(tmp_path / "direct" / "checkpoints" / "checkpoint-1"))
    want = _state(1)
    assert box.state["step"] == 7 and torch.equal(box.state["w"], want["w"]) and torch.equal(box.state["b"], want["b"])
    assert all(torch.equal(a, b) for a, b in zip(box.state["small"], want["small"], strict=True))
