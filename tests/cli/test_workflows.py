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
    combos = matrix_jobs(test["strategy"]["matrix"])
    assert {"3.10", "3.11", "3.12", "3.13"} <= {p for p, _ in combos}
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


def matrix_jobs(matrix: dict[str, Any]) -> set[tuple[str, str]]:
    """The (python, torch) jobs GitHub runs; each ``include`` here adds a job of its own."""
    jobs = {(p, t) for p in matrix["python"] for t in matrix["torch"]}
    jobs -= {(e["python"], e["torch"]) for e in matrix.get("exclude", [])}
    return jobs | {(i["python"], i["torch"]) for i in matrix.get("include", [])}


def release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def pin(path: Path, name: str) -> str:
    """The version ``name==X`` pins in a constraints file."""
    found = re.findall(rf"(?m)^{re.escape(name)}==(\S+)\s*$", path.read_text())
    assert len(found) == 1, f"{path.name} must pin {name} exactly once"
    return str(found[0])


def torch_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    floors = re.findall(r'"torch>=([\d.]+)"', text)
    assert len(floors) == 1, "pyproject.toml declares one torch floor"
    return str(floors[0])


def test_ci_tests_the_torch_floor_the_pinned_torch_and_the_newest_from_the_cpu_index() -> None:
    test = load("ci.yml")["jobs"]["test"]
    combos = matrix_jobs(test["strategy"]["matrix"])
    torches = sorted({t for _, t in combos}, key=release)
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", t) for t in torches), torches
    oldest, newest = torches[0], torches[-1]
    assert release(oldest)[:2] == release(torch_floor())[:2], "CI must test the declared floor"
    pinned = pin(ROOT / "constraints.txt", "torch")
    assert {p for p, t in combos if t == pinned} == set(test["strategy"]["matrix"]["python"])
    assert newest == pin(ROOT / "constraints-torch214.txt", "torch")
    assert 'pip install "torch==${{ matrix.torch }}" --index-url "$TORCH_CPU_INDEX"' in steps_text(test)


def tox_ini() -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ROOT / "tox.ini")
    return ini


def env_section(ini: configparser.ConfigParser, env: str) -> configparser.SectionProxy:
    return ini["testenv"] if env == "py" else ini[f"testenv:{env}"]


def test_tox_runs_the_readme_tests_on_the_pinned_torch_and_on_2_14_by_default() -> None:
    ini = tox_ini()
    envs = [e.strip() for e in ini["tox"]["env_list"].replace(",", " ").split()]
    assert envs == ["py", "torch214"]
    readme = (ROOT / "README.md").read_text()
    assert "pip install -c constraints.txt -e '.[test]'" in readme and "python -m pytest" in readme
    constraint_files = {}
    for env in envs:
        section = env_section(ini, env)
        commands = [c.split() for c in section["commands"].strip().splitlines()]
        assert commands[-1] == ["python", "-m", "pytest", "{posargs}"], env
        deps = section["deps"].split()
        assert "{tox_root}[test]" in deps and deps[deps.index("{tox_root}[test]") - 1] == "-e", env
        assert deps[0] == "-c", f"{env}: its torch must be constrained"
        constraint_files[env] = ROOT / deps[1].replace("{tox_root}/", "")
    assert pin(constraint_files["py"], "torch") == "2.13.0"
    assert pin(constraint_files["torch214"], "torch") == "2.14.1"
    assert ini["testenv:lint"]["commands"].split() == ["ruff", "check", "src", "tests", "harness", "bench"]
    assert "mypy" in ini["testenv:type"]["commands"]


def test_the_torch214_constraints_pin_every_large_companion_exactly() -> None:
    """Exact pins only: a range (triton~=3.8, nvidia-nvjitlink>=13.0.88) would let pip
    prefer a newer multi-hundred-MB release from the registry over the local file."""
    path = ROOT / "constraints-torch214.txt"
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    names = []
    for line in lines:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\d+(?:\.\d+)*)", line)
        assert m, f"{path.name}: {line!r} is not an exact pin"
        names.append(m.group(1).lower())
    assert len(names) == len(set(names))
    for needed in ("torch", "triton", "nvidia-nvjitlink", "nvidia-cudnn-cu13", "nvidia-nccl-cu13",
                   "nvidia-cublas", "cuda-toolkit", "cuda-pathfinder"):
        assert needed in names, f"{path.name} does not pin {needed}"


def test_older_torch_envs_are_opt_in_and_start_at_the_declared_floor() -> None:
    ini = tox_ini()
    default = set(ini["tox"]["env_list"].replace(",", " ").split())
    factored = next(s for s in ini.sections() if s.startswith("testenv:torch{"))
    names = ["torch" + f for f in re.fullmatch(r"testenv:torch\{([\d,]+)\}", factored).group(1).split(",")]
    assert not default & set(names), "an env that downloads a CUDA build must not run by default"
    versions = {}
    for line in ini[factored]["deps"].strip().splitlines():
        m = re.fullmatch(r"\s*(torch\d+): torch==(\d+)\.(\d+)\.\*\s*", line)
        if m:
            versions[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    assert sorted(versions) == sorted(names)
    for name, (major, minor) in versions.items():
        assert name == f"torch{major}{minor}", f"{name} installs torch {major}.{minor}"
    assert min(versions.values()) == release(torch_floor())[:2], "no env below the floor, one at it"
    assert ini[factored]["commands"].split()[-4:] == ["python", "-m", "pytest", "{posargs}"]
