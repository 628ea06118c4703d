"""DTensor state on real gloo worlds: FSDP2 and TP round trips, layout mismatches, mis-declarations."""

from __future__ import annotations

from pathlib import Path

import pytest

from distckpt import LayoutMismatchError, ReplicationMismatchError
from distckpt.dtensor import dtensor_type
from distckpt.testing.pool import WorldPool, WorldSpec

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(240),
              pytest.mark.skipif(dtensor_type() is None, reason="this torch has no DTensor")]


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


needs_fsdp2 = pytest.mark.skipif(not _fsdp_available(), reason="this torch has no torch.distributed.fsdp.fully_shard")


@needs_fsdp2
@pytest.mark.parametrize(("dcp_api", "load_options"),
                         [(True, {}), (False, {}), (True, {"load_in_place": False}),
                          (True, {"load_strategy": "read_and_broadcast"})],
                         ids=["dcp-state-dict-api", "plain-state-dict", "not-in-place", "read-and-broadcast"])
def test_fsdp2_model_and_optimizer_state_holding_dtensors_round_trip_bit_exact(
        pool: WorldPool, tmp_path: Path, dcp_api: bool, load_options: dict[str, object]) -> None:
    from tests.multirank import dtensor_ranks

    results = pool.run_ok(WorldSpec(nodes=1, procs_per_node=4, workdir=tmp_path),
                          dtensor_ranks.fsdp2_round_trip, dcp_api, load_options, timeout=180)
    for r in results:
        assert r["exact"] and r["differed_before"]
        assert r["exp_avg_type"] == "DTensor" and r["exp_avg_placements"] == ["S(0)"]
        assert r["dtensors"] >= 8  # 4 parameters, and exp_avg / exp_avg_sq of each
        assert r["writers"] == [0, 1, 2, 3]


def test_dtensor_tensor_parallel_model_and_optimizer_load_bit_exact_per_group_dp(pool: WorldPool, tmp_path: Path) -> None:
    from tests.multirank import dtensor_ranks

    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), dtensor_ranks.tp_round_trip,
                          timeout=180)
    assert all(r["exact"] for r in results)
    assert results[0]["writers"] == [0, 1]



@needs_fsdp2
@pytest.mark.parametrize(("save_options", "writers"), [({}, [0, 1]), ({"min_part_bytes": 64}, [0, 1, 2, 3])],
                         ids=["one-file-per-set", "balanced-parts"])
def test_hsdp_state_per_group_dp_round_trips_and_replicas_encode_the_same_bytes(
        pool: WorldPool, tmp_path: Path, save_options: dict[str, object], writers: list[int]) -> None:
    from tests.multirank import dtensor_ranks

    results = pool.run_ok(WorldSpec(nodes=2, procs_per_node=2, workdir=tmp_path), dtensor_ranks.hsdp_round_trip,
                          save_options, timeout=180)
    assert all(r["exact"] for r in results)
    assert results[0]["writers"] == writers  # parts: both members of each dp group write one

@needs_fsdp2
def test_loading_an_fsdp2_checkpoint_into_an_hsdp_layout_raises_layout_mismatch_on_every_rank(
        pool: WorldPool, tmp_path: Path) -> None:
    from tests.multirank import dtensor_ranks

    outcomes = pool.run(WorldSpec(nodes=1, procs_per_node=4, workdir=tmp_path), dtensor_ranks.fsdp2_into_hsdp,
                        timeout=180)
    assert all(isinstance(o.exception, LayoutMismatchError) for o in outcomes), [o.describe() for o in outcomes]
    messages = {str(o.exception) for o in outcomes}
    assert len(messages) == 1
    text = messages.pop()
    assert "entry 0.weight" in text and "mesh (dp=4) saved, (dp=2, shard=2) live" in text
    assert "torch.distributed.checkpoint" in text
    assert all(o.exception.failures.keys() == {0, 1, 2, 3} and o.exception.phase == "read" for o in outcomes)


@needs_fsdp2
@pytest.mark.parametrize(("shape", "dims", "group", "differing"),
                         [((4,), ("dp",), "dp", [[0], [1], [2], [3]]),
                          ((2, 2), ("dp", "shard"), "shard", [[0], [1]])],
                         ids=["fsdp2-model-per-group-dp", "hsdp-model-per-group-shard"])
def test_a_misdeclared_sharded_model_is_caught_by_validation_on_every_rank(
        pool: WorldPool, tmp_path: Path, shape: tuple[int, ...], dims: tuple[str, ...], group: str,
        differing: list[list[int]]) -> None:
    from tests.multirank import dtensor_ranks

    outcomes = pool.run(WorldSpec(nodes=1, procs_per_node=4, workdir=tmp_path), dtensor_ranks.misdeclared,
                        shape, dims, group, timeout=180)
    assert all(isinstance(o.exception, ReplicationMismatchError) for o in outcomes), [o.describe() for o in outcomes]
    text = str(outcomes[0].exception)
    assert "component 'model'" in text and "0.weight" in text
    assert " | ".join(str(g) for g in differing) in text
    assert "max abs difference" in text  # FULL level measured the local shards
    assert not any((tmp_path / "checkpoints").glob("checkpoint-*"))


def _gpu_workflow_dtensor_command() -> str:
    """The DTensor step's command of .github/workflows/gpu.yml, continuation lines joined."""
    yaml = pytest.importorskip("yaml")
    workflow = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "gpu.yml"
    steps = yaml.safe_load(workflow.read_text())["jobs"]["nccl"]["steps"]
    runs = [str(s.get("run", "")) for s in steps if "dtensor_torchrun" in str(s.get("run", ""))]
    assert len(runs) == 1, "gpu.yml runs the DTensor checks in exactly one step"
    lines = runs[0].replace("\\\n", " ").splitlines()
    (command,) = [line for line in lines if "torchrun" in line]
    return command


@needs_fsdp2
def test_the_gpu_workflows_dtensor_step_passes_under_real_torchrun_on_gloo(tmp_path: Path) -> None:
    import os
    import re
    import shlex
    import subprocess
    import sys

    command = _gpu_workflow_dtensor_command()
    assert "--backend nccl" in command and "--nproc-per-node=4" in command
    args = shlex.split(command.replace('"$RUNNER_TEMP/dtensor"', str(tmp_path)).replace("< /dev/null", ""))
    args = args[args.index("torchrun"):]  # drop the shell's `timeout 600`
    args[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    args[args.index("nccl")] = "gloo"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    done = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    passed = set(re.findall(r"rank (\d) \[gloo\] ([\w-]+): ok", done.stdout))  # ranks' lines may interleave
    assert len(passed) == 8 * 4, done.stdout  # eight checks on four ranks
