from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from distckpt import CheckpointExistsError, IntegrityError, ManifestError, folder, series, storage


def test_write_file_hashes_what_it_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "f")
    size, checksum = storage.write_file(path, [b"abc", memoryview(b"defg")])
    assert size == 7 and checksum == storage.checksum_of(b"abcdefg")
    assert storage.read_verified(path, 7, checksum) == bytearray(b"abcdefg")


def test_write_file_never_overwrites_or_follows_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "outside"
    target.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        storage.write_file(str(link), [b"x"])
    assert target.read_bytes() == b"precious"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "symlink"])
def test_read_verified_names_the_damaged_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "f"
    size, checksum = storage.write_file(str(path), [b"0123456789"])
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[3] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(b"01234")
    elif damage == "missing":
        path.unlink()
    else:
        real = tmp_path / "real"
        path.rename(real)
        path.symlink_to(real)
    with pytest.raises(IntegrityError, match=str(path)):
        storage.read_verified(str(path), size, checksum)


def test_commit_refuses_to_replace_a_checkpoint_unless_asked(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint-1"
    final.mkdir()
    (final / "old").write_text("old")
    staging = folder.create_staging(str(final), "n1")
    (Path(staging) / "new").write_text("new")
    with pytest.raises(CheckpointExistsError):
        folder.commit_directory(staging, str(final), overwrite=False)
    assert (final / "old").exists()
    folder.commit_directory(staging, str(final), overwrite=True)
    assert (final / "new").exists() and not (final / "old").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_clean_stale_removes_staging_and_trash_but_nothing_else(tmp_path: Path) -> None:
    (tmp_path / ".checkpoint-3.staging-abc").mkdir()
    (tmp_path / ".checkpoint-2.trash-def").mkdir()
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / ".hidden-user-file").write_text("keep")
    removed = folder.clean_stale(str(tmp_path))
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-user-file", "checkpoint-1"]


def test_listing_reports_broken_directories_with_their_reason(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "manifest.json").write_text("{")
    entries = series.list_checkpoints(str(tmp_path))
    assert [e.committed for e in entries] == [False, False]
    assert all(e.problem for e in entries)


def test_manifest_bytes_are_read_without_following_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("{}")
    (tmp_path / "manifest.json").symlink_to(real)
    with pytest.raises(ManifestError, match="symlink"):
        storage.read_manifest_bytes(str(tmp_path / "manifest.json"))


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage.atomic_write_bytes(str(tmp_path / "m.json"), b"{}")
    storage.atomic_write_bytes(str(tmp_path / "m.json"), b"[]")
    assert os.listdir(tmp_path) == ["m.json"] and (tmp_path / "m.json").read_bytes() == b"[]"


@pytest.mark.parametrize("sizes", [[10], [3 << 20] * 5, [1, 9 << 20, 7, 0, 12 << 20, 5]], ids=["inline", "threaded", "mixed"])
def test_the_pipelined_hasher_gives_the_digest_of_the_bytes_in_order(sizes: list[int]) -> None:
    blobs = [os.urandom(n) for n in sizes]
    hasher = storage.PipelinedHasher()
    for blob in blobs:
        hasher.update(memoryview(blob))
    assert f"xxh3-128:{hasher.hexdigest()}" == storage.checksum_of(b"".join(blobs))
    hasher.close()  # idempotent after hexdigest


def test_a_pipelined_hasher_closed_early_stops_its_thread() -> None:
    hasher = storage.PipelinedHasher()
    hasher.update(memoryview(bytes(20 << 20)))
    hasher.close()
    assert not any(t.name == "distckpt-hash" and t.is_alive() for t in threading.enumerate())


def _mixed_state(count: int, seed: int) -> dict[str, object]:
    import math

    import torch

    dtypes = [torch.float32, torch.int32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8,
              torch.complex64, torch.float64, torch.uint16, torch.int8]
    shapes = [(), (7,), (3, 5), (0,), (1, 1, 2), (257,)]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, object] = {}
    for i in range(count):
        dtype, shape = dtypes[i % len(dtypes)], shapes[(i * 7) % len(shapes)]
        raw = torch.randint(0, 256, (max(1, math.prod(shape)) * torch.empty(0, dtype=dtype).element_size(),),
                            dtype=torch.uint8, generator=gen)
        state[f"p{i}"] = raw.view(dtype)[: math.prod(shape)].reshape(shape)
    return state


@pytest.mark.parametrize("big", [0, 3])
def test_written_runs_are_the_encoded_bytes_and_their_checksum(tmp_path: Path, big: int) -> None:
    import torch

    from distckpt import codec

    state = _mixed_state(3000, big)
    for i in range(big):  # tensors written through the bounce buffers, between runs of packed ones
        state[f"big{i}"] = torch.randn(codec.PACK_BELOW // 4 + 1 + i)
    state["tail"] = torch.arange(5, dtype=torch.int16)
    encoded = codec.encode(state)
    kinds = {type(item).__name__ for item, _ in encoded.runs()}
    assert {"memoryview", "list"} <= kinds  # the header and large tensors as views, small ones in runs
    size, checksum = storage.write_runs(str(tmp_path / "f"), encoded.runs())
    expected = encoded.to_bytes()
    assert size == len(expected) and (tmp_path / "f").read_bytes() == expected
    assert checksum == storage.checksum_of(expected)


def test_runs_of_small_tensors_span_several_buffers_in_order(tmp_path: Path) -> None:
    import torch

    from distckpt import codec

    # 40 MiB of 40 KiB tensors: many packed runs, each up to RUN_BYTES, crossing bounce buffers
    state = {f"w{i}": torch.full((10240,), float(i)) for i in range(1024)}
    encoded = codec.encode(state)
    size, checksum = storage.write_runs(str(tmp_path / "f"), encoded.runs())
    data = storage.read_verified(str(tmp_path / "f"), size, checksum)
    back = codec.decode(data)
    assert all(torch.equal(back[k], v) for k, v in state.items())
