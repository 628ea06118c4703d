"""The CI definitions hold together: workflows parse and are pinned, tox runs what the README runs."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
USES = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")


def load(name: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict)
    return doc


def steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) for step in job.get("steps", []))


@pytest.mark.parametrize("name", ["ci.yml", "gpu.yml"])
def test_each_workflow_parses_reads_only_and_pins_every_action_to_a_commit(name: str) -> None:
    doc = load(name)
    triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers, f"{name}: no triggers"
    assert doc["permissions"] == {"contents": "read"}
    for job_name, job in doc["jobs"].items():
        assert "permissions" not in job or all(v in ("read", "none") for v in job["permissions"].values()), job_name
        assert job.get("timeout-minutes"), f"{name}: job {job_name} has no timeout"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}: {job_name}: step needs exactly one of uses/run"
    for line in (WORKFLOWS / name).read_text().splitlines():
        m = USES.match(line)
        if m:
            ref, comment = m.groups()
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), f"{name}: {ref} is not pinned to a SHA"
            assert re.fullmatch(r"\s*# v\d+(\.\d+)*", comment), f"{name}: {ref} lacks a '# vX.Y.Z' comment"


def test_ci_lints_types_builds_once_and_tests_the_wheel_across_python_and_torch() -> None:
    jobs = load("ci.yml")["jobs"]
    assert {"lint", "type", "build", "test"} <= set(jobs)
    test = jobs["test"]
    assert test["needs"] == "build"
    matrix = test["strategy"]["matrix"]
    pythons = set(matrix["python"]) | {i["python"] for i in matrix.get("include", [])}
    torches = set(matrix["torch"]) | {i["torch"] for i in matrix.get("include", [])}
    assert {"3.10", "3.11", "3.12", "3.13"} <= pythons and len(torches) >= 2
    run = steps_text(test)
    assert "--index-url \"$TORCH_CPU_INDEX\"" in run and "dist/distckpt-*.whl" in run
    assert "-e ." not in run, "the test job must install the built wheel, not the source tree"
    assert "python -m pytest" in run
    assert load("ci.yml")["env"]["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert "python -m build" in steps_text(jobs["build"])
    assert "tox -e lint" in steps_text(jobs["lint"]) and "mypy" in steps_text(jobs["type"])


def test_gpu_workflow_runs_every_scenario_under_torchrun_with_nccl_in_its_own_shape() -> None:
    job = load("gpu.yml")["jobs"]["nccl"]
    assert "self-hosted" in job["runs-on"] and "gpu" in job["runs-on"]
    assert set(job["strategy"]["matrix"]["launch"]) == {"single-node", "multi-node-on-one-host"}
    run = steps_text(job)
    assert "-m harness.worker" in run and "--backend nccl" in run
    assert '--standalone --nnodes=1 --nproc-per-node="$nproc"' in run
    assert '--nnodes="$nnodes" --node-rank="$node" --nproc-per-node="$nproc"' in run
    assert '--rdzv-backend=static --rdzv-endpoint="127.0.0.1:$port"' in run


def test_tox_default_env_runs_exactly_the_readme_tests_on_the_constrained_torch() -> None:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    assert ini["tox"]["env_list"].split() == ["py"]
    base = ini["testenv"]
    assert base["commands"].split() == ["python", "-m", "pytest", "{posargs}"]
    deps = base["deps"].split()
    assert "{tox_root}/constraints.txt" in deps and "{tox_root}[test]" in deps
    assert ini["testenv:lint"]["commands"].split() == ["ruff", "check", "src", "tests", "harness", "bench"]
    assert "mypy" in ini["testenv:type"]["commands"]
    for section in ini.sections():
        if section.startswith("testenv:torch"):
            assert "OPT-IN" in ini[section]["description"]
