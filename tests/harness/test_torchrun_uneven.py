"""``torchrun ... -m harness.worker`` under real torchrun with agents of different sizes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNEVEN = """
trainer = "per_node"
[topology]
procs_per_node = [2, 1]
[run]
steps = 2
save_at = 1
[components]
model = { pattern = "replicated" }
optimizer = { pattern = "replicated" }
scheduler = { pattern = "replicated" }
cache = { pattern = "per_node", validate = true }
dataset = { pattern = "per_rank" }
rng = { pattern = "per_rank" }
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_worker_runs_a_scenario_under_torchrun_agents_of_different_sizes(tmp_path: Path) -> None:
    scenario = tmp_path / "uneven.toml"
    scenario.write_text(UNEVEN)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    agents = []
    for node, procs in ((0, 2), (1, 1)):
        log = (tmp_path / f"agent{node}.log").open("w")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc-per-node={procs}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=uneven",
            "--max-restarts=0", "-m", "harness.worker", str(scenario), "--backend", "gloo",
            "--workdir", str(tmp_path / "w"),
        ]
        agents.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=240) for proc, _ in agents]
    finally:
        for proc, log in agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((tmp_path / f"agent{n}.log").read_text() for n in (0, 1))
    assert codes == [0, 0], logs
    assert "Traceback" not in logs, logs
    # c10d rendezvous may make either agent node 0: the worker takes the layout from the launcher.
    row = next(line for line in logs.splitlines() if line.startswith("uneven "))
    assert ("2+1" in row or "1+2" in row) and row.rstrip().endswith("yes"), row
    cache = tmp_path / "w" / "uneven" / "checkpoints" / "checkpoint-1" / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["node-000.safetensors", "node-001.safetensors"]


DUMP_ENV = """
import json, os, sys
names = {names!r}
with open(os.path.join(sys.argv[1], "rank-" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{n: os.environ.get(n) for n in names}}, f)
"""


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_pool_gives_every_rank_what_torchrun_gives_agents_of_different_sizes(tmp_path: Path) -> None:
    from distckpt.testing.worldspec import WorldSpec, rank_env

    names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME"]
    script = tmp_path / "dump_env.py"
    script.write_text(DUMP_ENV.format(names=names))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "MASTER_"))}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
             f"--nproc-per-node={procs}", "--master-addr=127.0.0.1", f"--master-port={port}",
             str(script), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for node, procs in ((0, 3), (1, 1))  # static rendezvous: node 0 is the agent of 3
    ]
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in agents]
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in agents] == [0, 0], outputs
    spec = WorldSpec(procs_per_node=(3, 1))
    for rank in range(4):
        real = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        ours = rank_env(spec, rank, "127.0.0.1", port, "x")
        assert real == {n: ours[n] for n in names}, (rank, real)
