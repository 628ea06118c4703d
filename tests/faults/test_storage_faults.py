"""Saving over a committed checkpoint, leftovers of a crash, retention whose delete fails.

The failing delete is real: ``chattr +i`` makes a directory or file immutable,
which even root cannot rename or unlink (falls back to a monkeypatched failure
where chattr is unavailable).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from distckpt import CheckpointExistsError
from tests.faults import scenario
from tests.property import worlds

pytestmark = pytest.mark.timeout(60)

EX = scenario.example()


def _save(out: Path, generation: int, **kw: object) -> list[object]:
    return worlds.save(EX, str(out), generation=generation, async_save=False, **kw)


def _load_is(out: Path, path: str | None, generation: int) -> None:
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, str(out), path=path))):
        if path is not None:
            assert report.path == path
        scenario.check_loaded(EX, rank, states, generation)


@pytest.mark.parametrize("how", ["same-id", "same-path"])
def test_saving_over_an_existing_committed_checkpoint_without_asking_fails_every_rank_and_keeps_it(
    tmp_path: Path, how: str,
) -> None:
    path = worlds.ok(_save(tmp_path, 0, checkpoint_id="5"))[0]
    target = {"checkpoint_id": "5"} if how == "same-id" else {"checkpoint_path": path}
    results = _save(tmp_path, 1, **target)
    assert all(type(r) is CheckpointExistsError and set(r.failures) == {0} and "overwrite=True" in str(r)
               for r in results), results
    assert scenario.committed(str(tmp_path)) == ["checkpoint-5"] and scenario.hidden_entries(str(tmp_path)) == []
    _load_is(tmp_path, None, 0)


def test_saving_over_an_existing_checkpoint_when_asked_replaces_it_whole_and_leaves_no_trash(tmp_path: Path) -> None:
    path = worlds.ok(_save(tmp_path, 0, checkpoint_id="5"))[0]
    assert worlds.ok(_save(tmp_path, 1, checkpoint_id="5", overwrite=True)) == [path] * 4
    assert scenario.committed(str(tmp_path)) == ["checkpoint-5"] and scenario.hidden_entries(str(tmp_path)) == []
    _load_is(tmp_path, path, 1)


def test_a_stale_staging_directory_from_a_crash_is_ignored_by_latest_and_removed_by_the_next_save(tmp_path: Path) -> None:
    good = worlds.ok(_save(tmp_path, 0))[0]
    parent = Path(good).parent
    stale = parent / ".checkpoint-2.staging-0123456789ab"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "dp-000.safetensors").write_bytes(b"half a file")
    shutil.copy(Path(good) / "manifest.json", stale / "manifest.json")  # even a manifest does not commit it
    trash = parent / ".checkpoint-0.trash-0123456789ab"
    trash.mkdir()
    (trash / "junk").write_bytes(b"x")
    _load_is(tmp_path, None, 0)  # latest is still the good one
    newest = worlds.ok(_save(tmp_path, 1))[0]
    assert scenario.hidden_entries(str(tmp_path)) == []
    assert scenario.committed(str(tmp_path)) == sorted([os.path.basename(good), os.path.basename(newest)])
    _load_is(tmp_path, None, 1)


@pytest.fixture
def immutable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``make(path)`` makes ``path`` undeletable for real (chattr +i), undone at teardown."""
    marked: list[Path] = []
    have_chattr = shutil.which("chattr") is not None and _chattr_works(tmp_path)

    def make(path: Path) -> None:
        if have_chattr:
            subprocess.run(["chattr", "+i", str(path)], check=True)
            marked.append(path)
        else:  # pragma: no cover - machines without chattr: the same failure, simulated
            from distckpt import storage

            real = storage.remove_checkpoint

            def refuse(p: str) -> None:
                if os.path.basename(p) == path.name or path.is_relative_to(p):
                    raise PermissionError(1, "Operation not permitted", p)
                real(p)

            monkeypatch.setattr(storage, "remove_checkpoint", refuse)

    yield make
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], check=False, capture_output=True)


def _chattr_works(tmp_path: Path) -> bool:
    probe = tmp_path / ".chattr-probe"
    probe.write_text("")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        return ok
    finally:
        probe.unlink()


def test_retention_whose_delete_fails_still_commits_on_every_rank_and_retires_the_old_checkpoint_later(
    tmp_path: Path, immutable: object, caplog: pytest.LogCaptureFixture,
) -> None:
    first = worlds.ok(_save(tmp_path, 0, coord_kw={"keep_last": 2}))[0]
    worlds.ok(_save(tmp_path, 1, coord_kw={"keep_last": 2}))
    immutable(Path(first))  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        third = worlds.ok(_save(tmp_path, 2, coord_kw={"keep_last": 2}))
    assert len(set(third)) == 1  # every rank got the same committed path
    assert "retention could not remove" in caplog.text and "checkpoint-1" in caplog.text
    assert scenario.committed(str(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    _load_is(tmp_path, first, 0)  # the checkpoint that could not be deleted is intact
    _load_is(tmp_path, None, 2)
    subprocess.run(["chattr", "-i", first], check=False, capture_output=True)
    worlds.ok(_save(tmp_path, 3, coord_kw={"keep_last": 2}))
    assert scenario.committed(str(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    assert scenario.hidden_entries(str(tmp_path)) == []


def test_retention_whose_delete_fails_midway_leaves_only_hidden_trash_that_the_next_save_removes(
    tmp_path: Path, immutable: object, caplog: pytest.LogCaptureFixture,
) -> None:
    first = worlds.ok(_save(tmp_path, 0, coord_kw={"keep_last": 1}))[0]
    stuck = Path(first) / "rng" / "rank-00002.safetensors"
    immutable(stuck)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="distckpt"):
        second = worlds.ok(_save(tmp_path, 1, coord_kw={"keep_last": 1}))[0]
    assert "retention could not remove" in caplog.text
    assert scenario.committed(str(tmp_path)) == [os.path.basename(second)]  # the half-deleted one is out of sight
    leftovers = scenario.hidden_entries(str(tmp_path))
    assert len(leftovers) == 1 and ".trash-" in leftovers[0]
    _load_is(tmp_path, None, 1)
    subprocess.run(["chattr", "-R", "-i", str(tmp_path / "checkpoints")], check=False, capture_output=True)
    worlds.ok(_save(tmp_path, 2, coord_kw={"keep_last": 1}))
    assert scenario.hidden_entries(str(tmp_path)) == []
    assert scenario.committed(str(tmp_path)) == ["checkpoint-3"]
