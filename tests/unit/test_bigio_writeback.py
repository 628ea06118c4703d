"""The write worker's writeback hints and its error path (issue 15, big saves).

The worker asks the kernel to start writing every few MiB it has written
(``storage.posix.start_writeback``), so the final fsync waits less. These tests
check the hints cover the file in order without ever changing what is written,
that a file system refusing them costs one call, and that a failure inside the
worker thread fails the save, removes the partial file and stops the thread.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import storage
from distckpt.storage import posix, writer

_MIB = 1024 * 1024


def _pieces() -> list[tuple[memoryview, bool]]:
    """About 22 MiB in pieces of odd sizes, some private (owned) and some bounced."""
    out: list[tuple[memoryview, bool]] = []
    for i, size in enumerate([3 * _MIB + 5, 7 * _MIB + 1, 1, 5 * _MIB, 6 * _MIB + 3]):
        data = torch.arange(size, dtype=torch.uint8) ^ i
        out.append((memoryview(data.numpy()).cast("B"), i % 2 == 1))
    return out


def _joined(pieces: list[tuple[memoryview, bool]]) -> bytes:
    return b"".join(bytes(v) for v, _ in pieces)


def _no_write_worker_alive() -> bool:
    return not any(t.name == "distckpt-write" and t.is_alive() for t in threading.enumerate())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_asks_the_kernel_for_a_regular_file_and_refuses_a_pipe_without_raising(
        tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 8192)
        assert posix.start_writeback(fd, 0, 8192) is True
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        assert posix.start_writeback(w, 0, 4096) is False  # ESPIPE: a hint refused, never an exception
    finally:
        os.close(r)
        os.close(w)


def test_a_large_file_asks_for_writeback_of_contiguous_ranges_from_its_start_and_is_written_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = posix.start_writeback

    def spy(fd: int, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return real(fd, offset, length)

    monkeypatch.setattr(writer, "_WRITEBACK_STEP", 2 * _MIB)
    monkeypatch.setattr(posix, "start_writeback", spy)
    pieces = _pieces()
    path = tmp_path / "f"
    size, checksum = storage.write_runs(str(path), pieces)
    expected = _joined(pieces)
    assert size == len(expected) and path.read_bytes() == expected
    assert checksum == storage.checksum_of(expected)
    assert len(calls) >= 5
    position = 0
    for offset, length in calls:
        assert offset == position and length >= 2 * _MIB
        position += length
    assert size - 2 * _MIB - 4 * _MIB <= position <= size  # all but the last hand-overs were hinted


def test_a_file_system_refusing_writeback_is_asked_once_per_file_and_the_file_is_still_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refuse(fd: int, offset: int, length: int) -> bool:
        calls.append(offset)
        return False

    monkeypatch.setattr(writer, "_WRITEBACK_STEP", _MIB)
    monkeypatch.setattr(posix, "start_writeback", refuse)
    pieces = _pieces()
    for name in ("a", "b"):
        _, checksum = storage.write_runs(str(tmp_path / name), pieces)
        assert (tmp_path / name).read_bytes() == _joined(pieces)
        assert checksum == storage.checksum_of(_joined(pieces))
    assert calls == [0, 0]


@pytest.mark.parametrize("failing_call", [1, 3])
def test_a_write_error_inside_the_worker_thread_fails_the_save_removes_the_file_and_stops_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    real = os.writev
    count = [0]

    def writev(fd: int, buffers: Any) -> int:
        count[0] += 1
        if count[0] == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    path = tmp_path / "f"
    with pytest.raises(OSError) as caught:
        storage.write_runs(str(path), _pieces())
    assert caught.value.errno == errno.ENOSPC
    assert not path.exists()
    assert _no_write_worker_alive()
    monkeypatch.setattr(os, "writev", real)
    storage.write_runs(str(path), _pieces())  # the thread's buffers are usable again afterwards
    assert path.read_bytes() == _joined(_pieces())


def test_an_exception_from_a_writeback_hint_fails_the_save_rather_than_being_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int, offset: int, length: int) -> bool:
        raise RuntimeError("hint exploded")

    monkeypatch.setattr(writer, "_WRITEBACK_STEP", _MIB)
    monkeypatch.setattr(posix, "start_writeback", broken)
    path = tmp_path / "f"
    with pytest.raises(RuntimeError, match="hint exploded"):
        storage.write_runs(str(path), _pieces())
    assert not path.exists() and _no_write_worker_alive()


def test_short_writes_in_the_worker_still_write_every_byte_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.writev

    def short(fd: int, buffers: Any) -> int:
        first = memoryview(buffers[0])
        return real(fd, [first[:max(1, len(first) // 3)]])  # a third of the first buffer only

    monkeypatch.setattr(os, "writev", short)
    pieces = _pieces()
    _, checksum = storage.write_runs(str(tmp_path / "f"), pieces)
    assert (tmp_path / "f").read_bytes() == _joined(pieces)
    assert checksum == storage.checksum_of(_joined(pieces))
