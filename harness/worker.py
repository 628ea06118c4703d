"""The same scenarios under a real launcher: ``torchrun ... -m harness.worker <scenario.toml>``.

Example (one machine, four processes)::

    torchrun --nnodes=1 --nproc-per-node=4 -m harness.worker scenarios/dp_tp_2x2.toml
    torchrun --nnodes=1 --nproc-per-node=1 -m harness.worker scenarios/single.toml --backend nccl

Every rank runs the scenario's phases in one process group, one after the
other: the reference run, the save run, and the resume run with a *fresh*
trainer (new model, generators and loader that only a correct load can
restore). Rank 0 gathers every rank's report, checks the checkpoint against the
oracle (using the launcher's real node layout) and prints the scenario's row;
the exit status is 0 only when the scenario met its expectation.

``--backend nccl`` (or ``auto`` with enough GPUs) gives each rank its own GPU
(``LOCAL_RANK``, or the global rank when one host has a GPU for every rank, as
when several agents simulate nodes on one host) and enables deterministic CUDA
algorithms. What a single
launch cannot do is skipped with a message: changing the world size between
save and resume (elastic and cross-world scenarios), and SIGKILL faults (the
launcher tears the whole job down when one worker dies).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness.worker", description="Run one scenario under torchrun."
    )
    parser.add_argument("scenario", help="scenario .toml file")
    parser.add_argument(
        "--backend",
        choices=("gloo", "nccl", "auto"),
        default="auto",
        help="process group backend (auto: nccl when every local rank has a GPU)",
    )
    parser.add_argument(
        "--workdir",
        default="runs/harness-worker",
        help="checkpoints go to WORKDIR/<scenario>/checkpoints/ (shared by all ranks)",
    )
    parser.add_argument(
        "--json", dest="json_path", metavar="FILE", help="rank 0 writes the result as JSON"
    )
    return parser


def _choose_backend(requested: str) -> str:
    import torch

    if requested != "auto":
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local:
        return "nccl"
    return "gloo"


def _skip_reason(scenario: Any) -> str | None:
    if scenario.elastic:
        return "the resuming world differs from the saving world; one launch has one world size"
    if any(f.kind == "sigkill" for f in scenario.faults):
        return "a SIGKILL fault makes the launcher stop every worker"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one scenario on this rank; returns the exit status (the same on every rank)."""
    args = _parser().parse_args(argv)
    from harness.scenario import ScenarioError, Topology, load_scenario

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if "RANK" not in os.environ:
        print("error: run me under torchrun (RANK is not set)", file=sys.stderr)
        return 2
    rank = int(os.environ["RANK"])
    reason = _skip_reason(scenario)
    if reason is not None:
        if rank == 0:
            print(f"SKIP {scenario.name}: {reason}")
        return 0
    world = int(os.environ["WORLD_SIZE"])
    if world != scenario.topology.world_size:
        if rank == 0:
            print(
                f"error: {scenario.path} needs {scenario.topology.world_size} ranks "
                f"({scenario.topology.describe()}); this launch has {world}",
                file=sys.stderr,
            )
        return 2
    backend = _choose_backend(args.backend)
    if backend == "nccl":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(rank if torch.cuda.device_count() >= world else local_rank)
        torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=scenario.run.world_timeout))
    try:
        try:
            sizes = _launch_node_sizes()
            topology = Topology(nodes=len(sizes), procs_per_node=sizes, mesh=scenario.topology.mesh)
        except LaunchLayoutError as exc:
            if rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            return 2
        return _run(scenario, topology, backend, Path(args.workdir), args.json_path)
    finally:
        dist.destroy_process_group()


class LaunchLayoutError(RuntimeError):
    """The launcher's ranks are not numbered node by node (the same on every rank)."""


def _launch_node_sizes() -> tuple[int, ...]:
    """The size of every node of this launch, from every rank's launcher variables; collective.

    torchrun numbers workers agent by agent, also when agents run different
    numbers of workers (``--nproc-per-node`` differing between nodes): node
    ``GROUP_RANK`` holds the ``LOCAL_WORLD_SIZE`` consecutive ranks after those of
    the nodes before it. Raises :class:`LaunchLayoutError` on every rank when the
    variables say otherwise.
    """
    import torch.distributed as dist

    mine = (
        int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
        int(os.environ.get("LOCAL_RANK", "0")),
        int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])),
    )
    places: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(places, mine)
    sizes: list[int] = []
    first = 0  # the first rank of the current node
    for rank, (node, local, size) in enumerate(places):
        if local == 0 and node == len(sizes):
            first = rank
            sizes.append(size)
        if node != len(sizes) - 1 or local != rank - first or size != sizes[-1] or local >= size:
            raise LaunchLayoutError(
                "the launcher's ranks are not numbered node by node: (GROUP_RANK, LOCAL_RANK, "
                f"LOCAL_WORLD_SIZE) by rank: {places}"
            )
    if list(Counter(p[0] for p in places).values()) != sizes:
        raise LaunchLayoutError(f"a node has fewer ranks than its LOCAL_WORLD_SIZE: {places}")
    return tuple(sizes)


def _run(scenario: Any, topology: Any, backend: str, workdir: Path, json_path: str | None) -> int:
    import json

    import torch.distributed as dist

    from distckpt.testing.worldspec import RankContext, place_of
    from harness import runner, session
    from harness.report import format_problems, format_row, table_header

    rank = dist.get_rank()
    s = dataclasses.replace(scenario, topology=topology, resume_topology=topology)
    if topology != scenario.topology:
        # The scenario's expected writers describe its own node layout; the oracle
        # still derives every file and writer from the launcher's real layout.
        s = dataclasses.replace(s, expect=dataclasses.replace(s.expect, writers={}))
        if rank == 0:
            print(
                f"note: {scenario.name} describes {scenario.topology.describe()}, this launch is "
                f"{topology.describe()}; checking against the launch's layout"
            )
    out = workdir / s.name
    if rank == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
    _barrier()
    node, local = place_of(topology.node_sizes, rank)
    ctx = RankContext(
        rank=rank,
        world_size=dist.get_world_size(),
        local_rank=local,
        node_rank=node,
        nodes=topology.nodes,
        procs_per_node=topology.procs_per_node,
        workdir=str(out),
        backend=backend,
        timeout=s.run.world_timeout,
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
    )
    result = runner.new_result(s)

    def judge(check: Any, *args: Any) -> None:
        # Judging never runs a collective, so a failed check cannot desynchronise the ranks.
        try:
            check(*args)
        except runner.Failed as exc:
            result.problems.append(str(exc))

    if s.expect.succeeds:
        reference = _gather(session.reference(ctx, s))
        saved = _gather(session.save(ctx, s))
        if rank == 0:
            judge(runner.check_saved, s, saved, out, result, topology)
        _barrier()
        resumed = _gather(session.resume(ctx, s, topology))
        judge(runner.check_resumed, s, resumed, result)
        diffs = runner.compare_runs(reference, saved, resumed, set(s.expected_skipped()))
        runner.record_exactness(s, diffs, result)
    else:
        saved = _gather(session.save(ctx, s))
        result.save_s = max(r.seconds for r in saved)
        if s.expect.stage == "save":
            judge(runner.check_error, s, saved, "save", result)
        else:
            if rank == 0:
                judge(runner.check_saved, s, saved, out, result, topology)
            _barrier()
            resumed = _gather(session.resume(ctx, s, topology))
            judge(runner.check_error, s, resumed, "load", result)
    result.met = not result.problems
    verdict = [result.met]
    dist.broadcast_object_list(verdict, src=0)
    if rank == 0:
        print(f"backend {backend}, {topology.describe()} (nodes x procs per node)")
        print(table_header(len(result.name)))
        print(format_row(result, len(result.name)))
        if result.problems:
            print(format_problems([result]))
        if json_path:
            with open(json_path, "w", encoding="utf-8") as f:
                json.dump(result.to_json(), f, indent=2)
    return 0 if verdict[0] else 1


def _gather(run: Any) -> list[Any]:
    import torch.distributed as dist

    runs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(runs, run)
    return runs


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


if __name__ == "__main__":
    sys.exit(main())
