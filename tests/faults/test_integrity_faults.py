"""Damaged component files: a flipped byte, a truncated file, a missing file, an extra file.

Every pattern's file is damaged in turn on a 2-node x 2-proc world (threaded:
the damage is on disk, the protocol is the real one). The ranks that read the
damaged file are exactly the ones named in ``failures``; every rank raises the
same :class:`IntegrityError`, and its message names the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distckpt import IntegrityError
from tests.faults import scenario
from tests.property import worlds
from tests.property.strategies import decl_files, decl_set_index

pytestmark = pytest.mark.timeout(60)

EX = scenario.example()
#: (component, rank whose replica set's file is damaged), one per pattern.
TARGETS = [("trainer", 0), ("scheduler", 2), ("rng", 3), ("optimizer", 2), ("model", 1), ("dataset", 3)]
IDS = [f"{k}-{EX.decl(k).pattern}" for k, _ in TARGETS]


def _saved(tmp_path: Path) -> str:
    return str(worlds.ok(worlds.save(EX, str(tmp_path), async_save=False))[0])


def _target(path: str, key: str, rank: int) -> tuple[str, tuple[int, ...]]:
    """The damaged file (relative path) and the ranks that read it, from the oracle."""
    rel, members, _ = decl_files(EX.decl(key), EX.topo)[decl_set_index(EX.decl(key), EX.topo, rank)]
    return rel, members


def _expect_integrity_error(tmp_path: Path, rel: str, members: tuple[int, ...], says: str, **load_kw: object) -> None:
    results = worlds.load(EX, str(tmp_path), **load_kw)
    assert all(type(r) is IntegrityError for r in results), results
    assert len({str(r) for r in results}) == 1
    assert set(results[0].failures) == set(members)
    assert all(rel in msg and says in msg for msg in results[0].failures.values()), results[0].failures


@pytest.mark.parametrize(("key", "rank"), TARGETS, ids=IDS)
def test_one_flipped_byte_in_a_component_file_fails_the_load_naming_the_file(tmp_path: Path, key: str, rank: int) -> None:
    path = _saved(tmp_path)
    rel, members = _target(path, key, rank)
    full = Path(path) / rel
    data = bytearray(full.read_bytes())
    data[len(data) // 2] ^= 0x01
    full.write_bytes(bytes(data))
    _expect_integrity_error(tmp_path, rel, members, "checksum mismatch")


@pytest.mark.parametrize(("key", "rank"), TARGETS, ids=IDS)
def test_a_truncated_component_file_fails_the_load_naming_the_file(tmp_path: Path, key: str, rank: int) -> None:
    path = _saved(tmp_path)
    rel, members = _target(path, key, rank)
    full = Path(path) / rel
    os.truncate(full, full.stat().st_size - 1)
    _expect_integrity_error(tmp_path, rel, members, "the manifest says")


@pytest.mark.parametrize(("key", "rank"), TARGETS, ids=IDS)
def test_a_missing_component_file_fails_the_load_naming_the_file(tmp_path: Path, key: str, rank: int) -> None:
    path = _saved(tmp_path)
    rel, members = _target(path, key, rank)
    (Path(path) / rel).unlink()
    _expect_integrity_error(tmp_path, rel, members, "missing")


EXTRAS = ["rng/rank-00099.safetensors", "model/dp-009.safetensors", "stray.bin"]


@pytest.mark.parametrize("extra", EXTRAS)
def test_an_extra_unlisted_file_is_reported_under_strict_naming_the_file(tmp_path: Path, extra: str) -> None:
    path = _saved(tmp_path)
    shutil_copy = (Path(path) / "rng" / "rank-00000.safetensors").read_bytes()
    (Path(path) / extra).write_bytes(shutil_copy)
    results = worlds.load(EX, str(tmp_path), strict=True)
    assert all(type(r) is IntegrityError and extra in str(r) for r in results), results


@pytest.mark.parametrize("extra", EXTRAS)
def test_an_extra_unlisted_file_does_not_disturb_a_non_strict_load(tmp_path: Path, extra: str) -> None:
    path = _saved(tmp_path)
    (Path(path) / extra).write_bytes(b"not a checkpoint file")
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, str(tmp_path), strict=False))):
        assert report.path == path
        scenario.check_loaded(EX, rank, states)
