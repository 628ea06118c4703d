"""Verified reads of large files (issue 15, big loads): the read loop hands pieces to a hashing
thread while it reads the next ones. These tests check that short reads, a file truncated or
damaged mid-read and an error inside the hashing thread are all reported, naming the file, and
that no thread is left behind."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import IntegrityError, hashing, storage
from distckpt.storage import reader

_MIB = 1024 * 1024


def _file(tmp_path: Path, size: int = 21 * _MIB + 7) -> tuple[str, bytes, str]:
    data = bytes((torch.arange(size, dtype=torch.int64) * 2654435761 % 251).to(torch.uint8).numpy())
    path = str(tmp_path / "data.bin")
    written, checksum = storage.write_file(path, [data])
    assert written == size
    return path, data, checksum


def _targets(size: int) -> tuple[list[torch.Tensor], list[memoryview]]:
    cuts = [0, 5, 3 * _MIB, 3 * _MIB + 1, 17 * _MIB, size]
    tensors = [torch.empty(b - a, dtype=torch.uint8) for a, b in itertools.pairwise(cuts)]
    return tensors, [memoryview(t.numpy()).cast("B") for t in tensors]


def _no_hash_worker_alive() -> bool:
    return not any(t.name == "distckpt-hash" and t.is_alive() for t in threading.enumerate())


def test_short_reads_still_place_every_byte_and_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data, checksum = _file(tmp_path)
    real = os.readv

    def short(fd: int, buffers: Any) -> int:
        first = memoryview(buffers[0])
        return real(fd, [first[:max(1, len(first) // 3)]])  # a third of the first buffer only

    monkeypatch.setattr(os, "readv", short)
    tensors, views = _targets(len(data))
    with storage.VerifiedReader(path, len(data), checksum) as r:
        r.read_into(views)
        r.finish()
    assert b"".join(bytes(t.numpy()) for t in tensors) == data
    assert _no_hash_worker_alive()


def test_a_file_truncated_while_being_read_is_named_and_leaves_no_thread(tmp_path: Path) -> None:
    path, data, checksum = _file(tmp_path)
    _, views = _targets(len(data))
    with pytest.raises(IntegrityError, match=r"data\.bin: file shrank"), \
            storage.VerifiedReader(path, len(data), checksum) as r:
        r.read_into(views[:3])
        os.truncate(path, 9 * _MIB)
        r.read_into(views[3:])
    assert _no_hash_worker_alive()


@pytest.mark.parametrize("where", [7, 4 * _MIB + 3, 21 * _MIB + 6])
def test_a_byte_damaged_anywhere_in_a_large_file_fails_the_check_naming_the_file(tmp_path: Path, where: int) -> None:
    path, data, checksum = _file(tmp_path)
    with open(path, "r+b") as f:
        f.seek(where)
        f.write(bytes([data[where] ^ 0x10]))
    _, views = _targets(len(data))
    with pytest.raises(IntegrityError, match=r"data\.bin: checksum mismatch"), \
            storage.VerifiedReader(path, len(data), checksum) as r:
        r.read_into(views)
        r.finish()
    with pytest.raises(IntegrityError, match=r"data\.bin: checksum mismatch"):
        storage.read_verified(path, len(data), checksum)
    assert _no_hash_worker_alive()


def test_an_error_inside_the_hashing_thread_fails_the_read_and_stops_the_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data, checksum = _file(tmp_path)

    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def update(self, view: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                raise MemoryError("hasher gave up")

        def hexdigest(self) -> str:
            return "0"

    monkeypatch.setattr(hashing, "new_hasher", lambda algorithm="": Failing())
    with pytest.raises(MemoryError, match="hasher gave up"):
        storage.read_verified(path, len(data), checksum)
    assert _no_hash_worker_alive()


@pytest.mark.parametrize("piece", [4093, 3 * _MIB + 1])
def test_any_read_piece_size_gives_the_same_bytes_and_a_verified_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    path, data, checksum = _file(tmp_path, 5 * _MIB + 3)
    monkeypatch.setattr(reader, "_READ_PIECE", piece)
    monkeypatch.setattr(hashing, "_HASH_BATCH", max(1, piece // 2))
    with storage.VerifiedReader(path, len(data), checksum) as r:
        head = bytes(r.read_to(10))
        rest = r.finish()
    assert head == data[:10] and bytes(rest) == data
