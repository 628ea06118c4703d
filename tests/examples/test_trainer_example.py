"""The trainer guide's example (docs/trainer.md, examples/trainer/train.py) under real torchrun.

Two launches on gloo with two ranks: the first trains from scratch, saves at step 3
and stops after step 5 as a crash would; the second resumes from checkpoint 3 with the
resume idiom and trains on. The second launch's state right after the load must equal
the first launch's state at step 3, and its steps 4 and 5 must equal the first
launch's, bit for bit, on every rank (model, optimizer, scheduler, data position,
RNG, step counter).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "trainer" / "train.py"
GUIDE = ROOT / "docs" / "trainer.md"

pytestmark = [pytest.mark.multirank, pytest.mark.slow, pytest.mark.timeout(600)]


def torchrun(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [launcher] if launcher else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("DISTCKPT_WAIT_WARNING_S", None)
    done = subprocess.run(
        [*command, "--standalone", "--nproc-per-node", "2", str(SCRIPT), "--out", str(out), *args],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def trace(path: Path) -> dict[str, str]:
    return dict(line.split() for line in path.read_text().splitlines())


def test_the_guides_example_resumes_bit_exact_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    torchrun(out, "--steps", "8", "--save-every", "3", "--stop-after", "5", "--trace", str(tmp_path / "first"))
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-3"]
    resumed = torchrun(out, "--steps", "8", "--save-every", "3", "--async-save",
                       "--trace", str(tmp_path / "second"))
    assert "at step 3" in resumed.stdout and "finished step 8" in resumed.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-3", "checkpoint-6"]
    for r in range(2):
        before, after = trace(tmp_path / "first" / f"rank-{r}.txt"), trace(tmp_path / "second" / f"rank-{r}.txt")
        assert list(before) == ["1", "2", "3", "4", "5"]
        assert list(after) == ["resumed-3", "4", "5", "6", "7", "8"]
        assert after["resumed-3"] == before["3"], f"rank {r}: the loaded state differs from the saved one"
        assert (after["4"], after["5"]) == (before["4"], before["5"]), f"rank {r}: the resumed run diverged"
    # the ranks' own state (data position, RNG) really differs, so each rank restored its own
    assert trace(tmp_path / "first" / "rank-0.txt")["3"] != trace(tmp_path / "first" / "rank-1.txt")["3"]


def test_a_checkpoint_staged_in_the_background_behind_the_next_step_resumes_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # checkpoint 6 is copied while step 7's forward and backward run; the trainer waits for the
    # copy before step 7's optimizer step
    torchrun(out, "--steps", "8", "--save-every", "6", "--background-staging", "--trace", str(tmp_path / "first"))
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-6"]
    resumed = torchrun(out, "--steps", "8", "--save-every", "100", "--trace", str(tmp_path / "second"))
    assert "at step 6" in resumed.stdout and "finished step 8" in resumed.stdout
    for r in range(2):
        before, after = trace(tmp_path / "first" / f"rank-{r}.txt"), trace(tmp_path / "second" / f"rank-{r}.txt")
        assert list(after) == ["resumed-6", "7", "8"]
        assert after["resumed-6"] == before["6"], f"rank {r}: the loaded state is not the state at the save"
        assert (after["7"], after["8"]) == (before["7"], before["8"]), f"rank {r}: the resumed run diverged"


def test_the_guide_shows_the_example_script_verbatim() -> None:
    assert f"```python\n{SCRIPT.read_text()}```\n" in GUIDE.read_text()
