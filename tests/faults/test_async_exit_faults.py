"""An asynchronous save is never silently lost at exit (issue 11, item 10).

Real processes, one per rank, each a plain script on gloo (``async_exit_main``):
it saves with ``async_save=True`` and exits without ``wait()``, with or without
``destroy_process_group()`` first. The save must commit before the processes
exit (status 0), or, when it fails, every rank logs an ERROR and exits non-zero.
Never an abort, never a silent status 0 with nothing committed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults import scenario

pytestmark = [pytest.mark.multirank]

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2


def _ranks(tmp_path: Path, mode: str) -> list[subprocess.CompletedProcess[str]]:
    store = tmp_path / "store"
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.faults.async_exit_main", str(r), str(WORLD), str(store),
                          str(out), mode], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
        for r in range(WORLD)
    ]
    done = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def _describe(done: list[subprocess.CompletedProcess[str]]) -> str:
    return "\n".join(f"rank {r}: exit {d.returncode}\n{d.stdout}{d.stderr[-3000:]}" for r, d in enumerate(done))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["plain", "destroy"], ids=["exit", "destroy-then-exit"])
def test_an_async_save_left_pending_at_exit_is_committed_before_the_processes_exit_cleanly(
    tmp_path: Path, mode: str,
) -> None:
    done = _ranks(tmp_path, mode)
    assert all(d.returncode == 0 for d in done), _describe(done)
    assert not any("terminate called" in d.stderr for d in done), _describe(done)
    out = str(tmp_path / "out")
    assert scenario.committed(out) == ["checkpoint-at-exit"], _describe(done)
    assert os.path.isfile(os.path.join(out, "checkpoints", "checkpoint-at-exit", "manifest.json"))
    assert scenario.hidden_entries(out) == []


@pytest.mark.timeout(180)
def test_an_async_save_that_fails_unobserved_logs_an_error_and_makes_every_rank_exit_non_zero(
    tmp_path: Path,
) -> None:
    done = _ranks(tmp_path, "fail")
    assert all(d.returncode == 1 for d in done), _describe(done)  # not 0, and not a signal (abort)
    for d in done:
        assert "main is done" in d.stdout, _describe(done)
        assert "asynchronous save of" in d.stderr and "nobody called wait()" in d.stderr, _describe(done)
        assert "injected: the disk went away" in d.stderr and "terminate called" not in d.stderr
    out = str(tmp_path / "out")
    assert scenario.committed(out) == [] and scenario.hidden_entries(out) == []
