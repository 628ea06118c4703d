"""A folder of checkpoints under attack: two jobs in one output_dir, an overwrite killed
halfway, FIFOs where files should be, and default ids that meet explicit ones.

Job A is a real gloo world (``world_pool``); job B, and every process that is
killed on purpose, is ``tests/faults/series_job.py`` in a subprocess of its own
(a threaded world). Everything that could hang runs under a subprocess or pool
timeout, so a regression fails instead of hanging.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from distckpt import CheckpointExistsError, CheckpointManifest
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.faults import ranks, scenario
from tests.faults.ranks import CALM_TIMEOUT, Fault
from tests.property import worlds

EX = scenario.example()
SPEC = WorldSpec(nodes=2, procs_per_node=2)
ROOT = Path(__file__).resolve().parents[2]
#: A subprocess that takes longer than this is hung (a FIFO opened for reading blocks forever).
HANG_S = 90


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _job(*args: str) -> subprocess.Popen[str]:
    env = _env()
    return subprocess.Popen([sys.executable, "-m", "tests.faults.series_job", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, Any]:
    try:
        out, err = proc.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"job hung for {HANG_S} s:\n{err[-3000:]}")
    if proc.returncode != 0:
        return proc.returncode, err[-3000:]
    return 0, json.loads(out.strip().splitlines()[-1])


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + HANG_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"job B ended before pausing: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "job B never reached its pause"
        time.sleep(0.05)


def _gloo_save(pool: WorldPool, out: str, generation: int, cid: str | None = None) -> list[dict[str, Any]]:
    outcomes = pool.run(SPEC, ranks.save, EX, out, generation, Fault(), cid, CALM_TIMEOUT, timeout=120)
    assert all(o.ok for o in outcomes), [o.describe() for o in outcomes if not o.ok]
    return [o.value for o in outcomes]


def _load_is(out: Path | str, path: str | None, generation: int) -> str:
    results = worlds.ok(worlds.load(EX, str(out), path=path))
    for rank, (_report, states) in enumerate(results):
        scenario.check_loaded(EX, rank, states, generation)
    return str(results[0][0].path)


def _sequence(path: str) -> int:
    return CheckpointManifest.load(os.path.join(path, "manifest.json")).sequence


# --------------------------------------------------------- two jobs, one folder

@pytest.mark.multirank
@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["write", "commit"])
def test_a_second_job_saving_into_the_same_folder_never_removes_a_live_save_and_both_commit_whole_under_distinct_names(
    world_pool: WorldPool, tmp_path: Path, phase: str,
) -> None:
    out = str(tmp_path)
    first = _gloo_save(world_pool, out, 0)[0]["path"]  # checkpoint-1 exists: the next default is contested
    ready, go = tmp_path / "b-ready", tmp_path / "b-go"
    job_b = _job("paused", out, "2", phase, str(ready), str(go))
    try:
        _wait_for(ready, job_b)  # B owns a staging directory and has claimed the next name
        a_values = _gloo_save(world_pool, out, 1)
    finally:
        go.touch()
    code, b_values = _finish(job_b)
    assert code == 0, b_values
    a_paths = {v.get("path") for v in a_values}
    b_paths = {v.get("path") for v in b_values}
    assert len(a_paths) == 1 and None not in a_paths, a_values
    assert len(b_paths) == 1 and None not in b_paths, b_values
    a_path, b_path = a_paths.pop(), b_paths.pop()
    assert a_path != b_path
    assert len({_sequence(first), _sequence(a_path), _sequence(b_path)}) == 3
    # Every committed checkpoint is whole: each loads bit-exact, on threads and on gloo ranks.
    assert scenario.committed(out) == sorted(os.path.basename(p) for p in (first, a_path, b_path))
    assert scenario.hidden_entries(out) == []
    _load_is(out, first, 0)
    _load_is(out, a_path, 1)
    _load_is(out, b_path, 2)
    loaded = world_pool.run(SPEC, ranks.load, EX, out, 2, b_path, timeout=120)
    assert all(o.ok and "error" not in o.value for o in loaded), [o.describe() for o in loaded]


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_a_second_job_asking_for_the_name_a_live_save_is_writing_is_refused_naming_it_and_the_live_save_commits(
    world_pool: WorldPool, tmp_path: Path,
) -> None:
    out = str(tmp_path)
    ready, go = tmp_path / "b-ready", tmp_path / "b-go"
    job_b = _job("paused", out, "2", "write", str(ready), str(go), "7")
    try:
        _wait_for(ready, job_b)
        a_values = _gloo_save(world_pool, out, 1, "7")
    finally:
        go.touch()
    code, b_values = _finish(job_b)
    assert code == 0, b_values
    for v in a_values:
        assert v.get("error") == "CheckpointExistsError", v
        assert "another save" in v["message"] and f"pid {job_b.pid}" in v["message"], v
    assert {v.get("path") for v in b_values} == {os.path.join(out, "checkpoints", "checkpoint-7")}, b_values
    assert scenario.committed(out) == ["checkpoint-7"] and scenario.hidden_entries(out) == []
    _load_is(out, None, 2)


@pytest.mark.timeout(300)
def test_the_staging_directory_of_a_job_that_died_is_removed_by_the_next_save_of_another_job(tmp_path: Path) -> None:
    out = str(tmp_path)
    ready = tmp_path / "b-ready"
    job_b = _job("paused", out, "2", "write", str(ready), str(tmp_path / "never"))
    _wait_for(ready, job_b)
    job_b.send_signal(signal.SIGKILL)
    job_b.wait(timeout=HANG_S)
    assert [n for n in scenario.hidden_entries(out) if ".staging-" in n]
    path = worlds.ok(worlds.save(EX, out, 1, async_save=False))[0]
    assert scenario.hidden_entries(out) == []
    assert scenario.committed(out) == [os.path.basename(path)]
    _load_is(out, None, 1)


# ------------------------------------------------------- overwrite=True is atomic

def _committed_under(final: str) -> str | None:
    """None if ``final`` holds a whole committed checkpoint right now, else what is wrong."""
    try:
        manifest = CheckpointManifest.load(os.path.join(final, "manifest.json"))
    except Exception as exc:  # any failure is the finding
        return f"{type(exc).__name__}: {exc}"
    for comp in manifest.components.values():
        for f in comp.files:
            if not os.path.isfile(os.path.join(final, f.path)):
                return f"{f.path} is missing"
    return None


@pytest.mark.timeout(120)
def test_an_overwrite_keeps_a_whole_committed_checkpoint_under_the_name_before_and_after_every_rename_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        from distckpt import locks
    except ImportError:  # a build without the one-step swap: its renames are watched all the same
        locks = None  # type: ignore[assignment]
    path = worlds.ok(worlds.save(EX, str(tmp_path), 0, async_save=False, checkpoint_id="5"))[0]
    probe_dir = tmp_path / "probe"
    (probe_dir / "a").mkdir(parents=True)
    (probe_dir / "b").mkdir()
    if locks is not None and not locks.rename_exchange(str(probe_dir / "a"), str(probe_dir / "b")):
        pytest.skip("this OS or file system has no renameat2(RENAME_EXCHANGE); the fallback is tested below")
    seen: list[str] = []
    steps = 0

    def check(when: str) -> None:
        problem = _committed_under(path)
        if problem is not None:
            seen.append(f"{when}: {problem}")

    def watched(real: Any) -> Any:
        def step(src: Any, dst: Any, *args: Any, **kw: Any) -> Any:
            nonlocal steps
            involved = path in (os.fspath(src), os.fspath(dst))
            if involved:
                steps += 1
                check(f"before {real.__name__}({os.path.basename(os.fspath(src))}, {os.path.basename(os.fspath(dst))})")
            result = real(src, dst, *args, **kw)
            if involved:
                check(f"after {real.__name__}")
            return result
        step.__name__ = real.__name__
        return step

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(os, "replace", watched(os.replace))
    if locks is not None:
        monkeypatch.setattr(locks, "rename_exchange", watched(locks.rename_exchange))
    assert worlds.ok(worlds.save(EX, str(tmp_path), 1, async_save=False, checkpoint_id="5", overwrite=True)) == [path] * 4
    assert steps >= 1 and seen == []
    assert scenario.committed(str(tmp_path)) == ["checkpoint-5"] and scenario.hidden_entries(str(tmp_path)) == []
    _load_is(tmp_path, path, 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("found_by", ["load-latest", "next-save"])
@pytest.mark.parametrize(("fault", "survivor"), [
    ("exchange-then-kill", 1),       # swapped in one step, killed before deleting the old one: the new one stays
    ("fallback-kill-between", 0),    # no swap call: killed between the renames; the old one comes back
])
def test_an_overwrite_killed_midway_leaves_the_old_or_the_new_checkpoint_under_its_name_and_the_stranded_old_one_is_restored_not_deleted(
    tmp_path: Path, fault: str, survivor: int, found_by: str,
) -> None:
    out = str(tmp_path)
    path = worlds.ok(worlds.save(EX, out, 0, async_save=False, checkpoint_id="5"))[0]
    code, err = _finish(_job("overwrite", out, "1", "5", fault))
    assert code == -signal.SIGKILL, err
    if found_by == "load-latest":
        assert _load_is(out, None, survivor) == path  # the listing finds (and restores) it under its name
    else:
        newer = worlds.ok(worlds.save(EX, out, 2, async_save=False, checkpoint_id="6"))[0]
        _load_is(out, path, survivor)  # explicit load: no listing involved, the save restored it
        _load_is(out, newer, 2)
    assert "checkpoint-5" in scenario.committed(out)
    if found_by == "next-save":
        assert scenario.hidden_entries(out) == []


@pytest.mark.timeout(300)
def test_an_overwrite_whose_rename_into_place_fails_raises_on_every_rank_and_keeps_the_old_checkpoint_under_its_name(
    tmp_path: Path,
) -> None:
    out = str(tmp_path)
    worlds.ok(worlds.save(EX, out, 0, async_save=False, checkpoint_id="5"))
    code, values = _finish(_job("overwrite", out, "1", "5", "fallback-rename-fails"))
    assert code == 0, values
    assert all(v.get("error") and "injected: the rename into place failed" in v["message"] for v in values), values
    assert len({v["message"] for v in values}) == 1
    assert scenario.committed(out) == ["checkpoint-5"] and scenario.hidden_entries(out) == []
    _load_is(out, None, 0)


# ------------------------------------------------------------- not a regular file

def _fifo_folder(tmp_path: Path) -> tuple[str, str, str]:
    """A folder with a good checkpoint, one whose manifest is a FIFO and one whose file is a FIFO."""
    out = str(tmp_path)
    bad_file = worlds.ok(worlds.save(EX, out, 0, async_save=False, checkpoint_id="pipe"))[0]
    good = worlds.ok(worlds.save(EX, out, 0, async_save=False))[0]  # the newest: "latest"
    bad_manifest = os.path.join(out, "checkpoints", "checkpoint-fifo")
    os.makedirs(bad_manifest)
    os.mkfifo(os.path.join(bad_manifest, "manifest.json"))
    manifest = CheckpointManifest.load(os.path.join(bad_file, "manifest.json"))
    target = os.path.join(bad_file, manifest.components["rng"].files_for_rank(2)[0].path)
    os.unlink(target)
    os.mkfifo(target)
    return good, bad_manifest, bad_file


@pytest.mark.timeout(300)
def test_a_fifo_as_a_manifest_blocks_no_save_and_no_load_and_is_refused_by_name(tmp_path: Path) -> None:
    good, bad_manifest, _ = _fifo_folder(tmp_path)
    code, result = _finish(_job("fifo", str(tmp_path)))
    assert code == 0, result
    assert {v.get("path") for v in result["latest"]} == {good}, result["latest"]  # the FIFO one is skipped
    saved = {v.get("path") for v in result["saved"]}
    assert len(saved) == 1 and None not in saved, result["saved"]
    for v in result["explicit"]:
        assert v.get("error") == "ManifestError" and "not a regular file" in v["message"], v
        assert os.path.join(bad_manifest, "manifest.json") in v["message"]
    assert "not a regular file" in dict(result["listed"])["checkpoint-fifo"]
    _load_is(tmp_path, good, 0)


@pytest.mark.multirank
@pytest.mark.timeout(300)
def test_a_fifo_as_a_component_file_fails_every_gloo_rank_naming_it_instead_of_blocking_its_reader(
    world_pool: WorldPool, tmp_path: Path,
) -> None:
    _, _, bad_file = _fifo_folder(tmp_path)
    outcomes = world_pool.run(SPEC, ranks.load, EX, str(tmp_path), 0, bad_file, timeout=120)
    values = [o.value for o in outcomes]
    assert all(o.ok for o in outcomes), [o.describe() for o in outcomes if not o.ok]
    for v in values:
        assert v.get("error") == "IntegrityError", v
        assert set(v["failures"]) == {2} and "not a regular file" in v["failures"][2], v


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "distckpt", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=HANG_S, env=_env())
    except subprocess.TimeoutExpired:
        pytest.fail(f"`distckpt {' '.join(args)}` hung on a FIFO")


@pytest.mark.timeout(300)
def test_the_cli_lists_inspects_and_verifies_a_folder_with_fifos_without_blocking(tmp_path: Path) -> None:
    _, bad_manifest, bad_file = _fifo_folder(tmp_path)
    listed = _cli("ls", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "checkpoint-fifo" in listed.stdout and "not a regular file" in listed.stdout, listed.stdout
    inspected = _cli("inspect", bad_manifest)
    assert inspected.returncode != 0 and "not a regular file" in inspected.stderr, inspected
    verified = _cli("verify", bad_file)
    assert verified.returncode != 0, verified
    assert "not a regular file" in verified.stdout + verified.stderr, verified


# ---------------------------------------------------------------- default ids

@pytest.mark.timeout(120)
def test_a_default_id_after_an_explicit_one_that_took_its_number_is_a_free_name(tmp_path: Path) -> None:
    out = str(tmp_path)
    explicit = worlds.ok(worlds.save(EX, out, 0, async_save=False, checkpoint_id="2"))[0]
    results = worlds.save(EX, out, 1, async_save=False)
    assert not any(isinstance(r, CheckpointExistsError) for r in results), results
    second = worlds.ok(results)[0]
    third = worlds.ok(worlds.save(EX, out, 2, async_save=False))[0]
    assert len({explicit, second, third}) == 3
    assert scenario.committed(out) == sorted(os.path.basename(p) for p in (explicit, second, third))
    assert _sequence(explicit) < _sequence(second) < _sequence(third)
    assert _load_is(out, None, 2) == third
    _load_is(out, explicit, 0)
    _load_is(out, second, 1)


@pytest.mark.timeout(120)
def test_a_default_id_skips_a_name_held_by_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    out = str(tmp_path)
    worlds.ok(worlds.save(EX, out, 0, async_save=False))  # checkpoint-1
    squatter = os.path.join(out, "checkpoints", "checkpoint-2")
    os.makedirs(squatter)
    second = worlds.ok(worlds.save(EX, out, 1, async_save=False))[0]
    assert second != squatter and os.listdir(squatter) == []
    assert _load_is(out, None, 1) == second


# ----------------------------------------------------------- a stuck lock holder

@pytest.mark.timeout(120)
def test_a_process_stuck_holding_the_folder_lock_fails_the_save_on_every_rank_instead_of_hanging_it(
    tmp_path: Path,
) -> None:
    from distckpt import CheckpointBusyError

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\n"
         "time.sleep(120)\n", str(folder)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        results = worlds.save(EX, str(tmp_path), 0, async_save=False, coord_kw={"timeout": 4.0})
        assert all(isinstance(r, CheckpointBusyError) and str(folder) in str(r) for r in results), results
        assert scenario.committed(str(tmp_path)) == [] and scenario.hidden_entries(str(tmp_path)) == []
    finally:
        holder.kill()
        holder.wait()
    path = worlds.ok(worlds.save(EX, str(tmp_path), 0, async_save=False))[0]
    assert _load_is(tmp_path, None, 0) == path


@pytest.mark.timeout(120)
def test_where_directories_cannot_be_flocked_the_folder_lock_is_a_lock_file_that_excludes_other_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distckpt import locks

    real_flock = fcntl.flock

    def files_only(fd: int, operation: int) -> None:  # as on NFS: flock needs a file open for writing
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", files_only)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    try_lock = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
                "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
                "except BlockingIOError:\n    print('busy')\n")
    with locks.folder_lock(str(folder)):
        lock_file = folder / locks.FOLDER_LOCK_FILE
        assert lock_file.is_file()
        held = subprocess.run([sys.executable, "-c", try_lock, str(lock_file)], capture_output=True, text=True,
                              timeout=HANG_S)
        assert held.stdout.strip() == "busy", held
    released = subprocess.run([sys.executable, "-c", try_lock, str(lock_file)], capture_output=True, text=True,
                              timeout=HANG_S)
    assert released.stdout.strip() == "free", released
    path = worlds.ok(worlds.save(EX, str(tmp_path), 0, async_save=False))[0]  # a whole save on such a folder
    assert _load_is(tmp_path, None, 0) == path
    assert [n for n in scenario.hidden_entries(str(tmp_path)) if n != locks.FOLDER_LOCK_FILE] == []
