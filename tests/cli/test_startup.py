"""The quick commands start without torch (issue 14 item 8): each runs in a fresh interpreter,
as the console script does, and reports whether ``torch`` was ever imported. Nothing is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distckpt import CheckpointCoordinator, StateComponent
from tests.helpers import Box

# What the console script does (``distckpt = distckpt.cli:main``), then a look at sys.modules.
_PROBE = """
import json, sys
from distckpt.cli import main
code = main(sys.argv[1:])
print(json.dumps({"exit": code, "torch": "torch" in sys.modules}))
"""

# What ``python -m distckpt`` does.
_PROBE_DASH_M = """
import json, runpy, sys
sys.argv = ["distckpt", *sys.argv[1:]]
try:
    runpy.run_module("distckpt", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "torch": "torch" in sys.modules}))
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output directory with one committed checkpoint and one original-format checkpoint."""
    out = tmp_path_factory.mktemp("startup")
    CheckpointCoordinator([StateComponent("model", Box({"w": torch.ones(4, 4)}), "global"),
                           StateComponent("trainer", Box({"step": 3}), "global")],
                          output_dir=out).save_checkpoint(checkpoint_id="1")
    legacy = out / "checkpoints" / "old-legacy"
    legacy.mkdir()
    torch.save({"w": torch.zeros(2)}, legacy / "model_state.pt")
    return out


def probe(script: str, *argv: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["ls", "{out}"],
    ["ls", "--json", "{out}"],
    ["inspect", "{ckpt}"],
    ["inspect", "--files", "--json", "{ckpt}"],
    ["inspect", "{legacy}"],
    ["verify", "{ckpt}"],
])
def test_the_quick_commands_never_import_torch(run_dir: Path, argv: list[str]) -> None:
    paths = {"out": str(run_dir), "ckpt": str(run_dir / "checkpoints" / "checkpoint-1"),
             "legacy": str(run_dir / "checkpoints" / "old-legacy")}
    result = probe(_PROBE, *(a.format(**paths) for a in argv))
    assert result == {"exit": 0, "torch": False}


def test_python_dash_m_distckpt_version_never_imports_torch() -> None:
    assert probe(_PROBE_DASH_M, "--version") == {"exit": 0, "torch": False}


def test_the_probe_sees_torch_when_a_command_needs_it(run_dir: Path) -> None:
    ckpt = str(run_dir / "checkpoints" / "checkpoint-1")
    assert probe(_PROBE, "diff", ckpt, ckpt) == {"exit": 0, "torch": True}
