"""The verified reader's batched ``read_into``: whole batches hashed in one hand-over, short reads
handled view by view, large views read in pieces, empty views skipped; the checksum always that
of the file's bytes, in order."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from distckpt import hashing
from distckpt.errors import IntegrityError
from distckpt.storage import reader as reader_module
from distckpt.storage.reader import VerifiedReader


def _file(tmp_path: Path, size: int, seed: int = 0) -> tuple[str, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    return str(path), data


def _views(sizes: list[int]) -> tuple[list[bytearray], list[memoryview]]:
    buffers = [bytearray(n) for n in sizes]
    return buffers, [memoryview(b) for b in buffers]


@pytest.mark.parametrize("piece", [reader_module._READ_PIECE, 1000], ids=["default-pieces", "small-pieces"])
@pytest.mark.parametrize("short", [False, True], ids=["whole-reads", "short-reads"])
def test_read_into_places_every_byte_and_the_checksum_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int, short: bool) -> None:
    rng = random.Random(7)
    sizes = [rng.choice([0, 1, 3, 64, 999, 1000, 1001, 4096]) for _ in range(1500)] + [5000]
    path, data = _file(tmp_path, sum(sizes) + 123)
    monkeypatch.setattr(reader_module, "_READ_PIECE", piece)
    if short:
        real = os.readv
        cut = random.Random(1)

        def short_readv(fd: int, buffers: list[memoryview]) -> int:
            limit = cut.randint(1, 3000)  # stop anywhere: inside a view, at its end, after several
            kept, total = [], 0
            for b in buffers:
                if total + len(b) >= limit:
                    kept.append(b[:limit - total])
                    break
                kept.append(b)
                total += len(b)
            return real(fd, kept)
        monkeypatch.setattr(reader_module.os, "readv", short_readv)
    buffers, views = _views(sizes)
    given = list(views)
    with VerifiedReader(path, len(data), hashing.checksum_of(data)) as reader:
        reader.read_into(views)
        assert views == given  # the caller's list is left as it was
        assert reader.position == sum(sizes)
        whole = reader.finish()
    assert b"".join(buffers) == data[:sum(sizes)]
    assert bytes(whole[sum(sizes):]) == data[sum(sizes):]


def test_a_damaged_byte_in_a_batch_read_in_place_fails_the_checksum_naming_the_file(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 700 * 100)
    checksum = hashing.checksum_of(data)
    damaged = bytearray(data)
    damaged[600 * 100 + 5] ^= 1  # in the second readv batch
    Path(path).write_bytes(bytes(damaged))
    _, views = _views([100] * 700)
    with VerifiedReader(path, len(data), checksum) as reader:
        reader.read_into(views)
        with pytest.raises(IntegrityError, match=r"f\.bin: checksum mismatch"):
            reader.finish()


def test_a_file_shorter_than_the_views_is_reported_as_shrunk(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 1000)
    _, views = _views([600, 600])
    with VerifiedReader(path, len(data), hashing.checksum_of(data)) as reader, \
            pytest.raises(IntegrityError, match="shrank"):
        reader.read_into(views)
