"""Symlinks pointing outside the checkpoint: refused, at load and at save.

The outside targets hold *identical* bytes, so only the refusal to follow a link
(not a checksum) can stop them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from distckpt import CheckpointCoordinator, CheckpointError, CheckpointNotFoundError, IntegrityError
from tests.faults import scenario
from tests.property import worlds

pytestmark = pytest.mark.timeout(60)

EX = scenario.example()


def _saved(out: Path) -> str:
    return str(worlds.ok(worlds.save(EX, str(out), async_save=False))[0])


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    out, outside = tmp_path / "run", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    return out, outside


@pytest.mark.parametrize("rel", ["rng/rank-00001.safetensors", "scheduler/replicated.safetensors",
                                 "model/dp-001.safetensors"])
def test_a_component_file_replaced_by_a_symlink_outside_is_refused(dirs: tuple[Path, Path], rel: str) -> None:
    out, outside = dirs
    path = Path(_saved(out))
    copy = outside / "copy.safetensors"
    shutil.move(path / rel, copy)
    os.symlink(copy, path / rel)
    results = worlds.load(EX, str(out))
    assert all(type(r) is IntegrityError and "symlink" in str(r) and rel in str(r) for r in results), results


@pytest.mark.parametrize("key", ["rng", "trainer"])
def test_a_component_directory_replaced_by_a_symlink_outside_is_refused(dirs: tuple[Path, Path], key: str) -> None:
    out, outside = dirs
    path = Path(_saved(out))
    shutil.move(path / key, outside / key)
    os.symlink(outside / key, path / key)
    results = worlds.load(EX, str(out))
    assert all(type(r) is IntegrityError and "symlink" in str(r) for r in results), results


def test_a_checkpoint_directory_that_is_a_symlink_is_neither_loaded_nor_latest(dirs: tuple[Path, Path]) -> None:
    out, outside = dirs
    path = Path(_saved(out))
    worlds.ok(worlds.save(EX, str(out), generation=1, async_save=False))
    shutil.copytree(path, outside / "evil")
    os.symlink(outside / "evil", path.parent / "checkpoint-99")
    link = str(path.parent / "checkpoint-99")
    results = worlds.load(EX, str(out), path=link)
    assert all(type(r) is CheckpointNotFoundError and "symlink" in str(r) for r in results), results
    assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == str(path.parent / "checkpoint-2")


def _swap_staging_for_a_link(out: Path, outside: Path, move_contents: bool) -> None:
    parent = out / "checkpoints"
    (staging,) = [p for p in parent.iterdir() if ".staging-" in p.name]
    target = outside / "staging"
    if move_contents:
        shutil.copytree(staging, target)
    else:
        target.mkdir()
    shutil.rmtree(staging)
    os.symlink(target, staging)


def test_a_staging_directory_replaced_by_a_symlink_outside_before_the_writes_is_refused(dirs: tuple[Path, Path]) -> None:
    out, outside = dirs
    previous = _saved(out)

    def hook(phase: str, rank: int) -> None:
        if phase == "validate" and rank == 0:  # after plan made staging, before anyone writes
            _swap_staging_for_a_link(out, outside, move_contents=False)

    results = worlds.save(EX, str(out), generation=1, hook=hook, async_save=False)
    assert all(type(r) is IntegrityError and "staging directory is a symlink" in str(r) for r in results), results
    assert list((outside / "staging").iterdir()) == []  # nothing was written through the link
    assert scenario.committed(str(out)) == [os.path.basename(previous)]
    worlds.ok(worlds.save(EX, str(out), generation=2, async_save=False))  # the next save clears the link away
    assert scenario.hidden_entries(str(out)) == [] and (outside / "staging").is_dir()


def test_a_staging_directory_replaced_by_a_symlink_outside_before_the_commit_is_refused(dirs: tuple[Path, Path]) -> None:
    out, outside = dirs
    previous = _saved(out)

    def hook(phase: str, rank: int) -> None:
        if phase == "commit" and rank == 0:  # the files are written; the manifest is not
            _swap_staging_for_a_link(out, outside, move_contents=True)

    results: list[Any] = worlds.save(EX, str(out), generation=1, hook=hook, async_save=False)
    outside_files = sorted(p.name for p in (outside / "staging").iterdir())
    assert all(isinstance(r, CheckpointError) for r in results), results
    assert "manifest.json" not in outside_files, "the manifest was written outside the checkpoint directory"
    assert scenario.committed(str(out)) == [os.path.basename(previous)]


def test_a_stale_staging_symlink_is_removed_by_the_next_save_without_touching_its_target(dirs: tuple[Path, Path]) -> None:
    out, outside = dirs
    _saved(out)
    (outside / "precious").write_text("keep me")
    os.symlink(outside, out / "checkpoints" / ".checkpoint-7.staging-deadbeef")
    worlds.ok(worlds.save(EX, str(out), generation=1, async_save=False))
    assert scenario.hidden_entries(str(out)) == []
    assert (outside / "precious").read_text() == "keep me"
