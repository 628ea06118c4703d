"""Scale on paper: planning, manifest and collective counts for worlds we cannot launch.

Everything here runs in-process on the library's pure modules, as the
coordinator calls them (``planning.agree`` on the ranks' compact reports, then
``layout.plan_component`` per component, ``planning.build_manifest`` as the
commit does, the manifest's JSON both ways), for a DP x PP x TP mesh of 1,024,
16,384 or 65,536 ranks with 8 ranks per node. The plan phase's bytes on the
wire come from running TorchComm's own steps for the whole world in one
process (:func:`distckpt.wire.lockstep`). It also sizes what a load's *resolve* phase
carries to every rank: the compact reports' all-gather (``world x`` a report) and
the manifest, which rank 0 broadcasts (``collectives.announce``), once.

The collective count is measured, not derived: a :class:`distckpt.testing.ThreadComm`
world runs real saves and loads with 1 and with 50 components while every
``all_gather`` call is counted.
"""

from __future__ import annotations

import gc
import pickle
import statistics
import tempfile
import time
from typing import Any

MESHES = {1024: (16, 8, 8), 16384: (256, 8, 8), 65536: (1024, 8, 8)}  # (dp, pp, tp)
RANKS_PER_NODE = 8


def _components() -> list[tuple[str, str, str | None]]:
    return [
        ("model", "per_group", "dp"),
        ("optimizer", "per_group", "dp"),
        ("dataloader", "per_group", "mp"),
        ("rng", "per_rank", None),
        ("scheduler", "replicated", None),
        ("node_cache", "per_node", None),
    ]


def _reports(world: int, dims: tuple[int, int, int]) -> tuple[list[str], list[dict[str, tuple[int, ...]]]]:
    dp, pp, tp = dims
    assert dp * pp * tp == world

    def rank_of(d: int, p: int, t: int) -> int:
        return (d * pp + p) * tp + t

    nodes = [f"host-{r // RANKS_PER_NODE:05d}" for r in range(world)]
    groups: list[dict[str, tuple[int, ...]]] = []
    for r in range(world):
        d, rest = divmod(r, pp * tp)
        p, t = divmod(rest, tp)
        groups.append({
            "dp": tuple(rank_of(x, p, t) for x in range(dp)),
            "pp": tuple(rank_of(d, x, t) for x in range(pp)),
            "tp": tuple(rank_of(d, p, x) for x in range(tp)),
            "mp": tuple(range(d * pp * tp, (d + 1) * pp * tp)),
        })
    return nodes, groups


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def plan_at_scale(world: int, repeats: int = 3) -> dict[str, Any]:
    from distckpt import CheckpointManifest, StateComponent
    from distckpt.coordinator import DEFAULT_MIN_PART_BYTES
    from distckpt.planning import (
        SavePlan,
        agree,
        build_manifest,
        local_report,
        part_counts,
        plan_components,
        plan_digest,
        with_parts,
    )
    from distckpt.planreports import plan_vote

    from .workloads import Holder

    dims = MESHES[world]
    nodes, groups = _reports(world, dims)
    comps = _components()
    declared = [StateComponent(key, Holder({}), pat, process_group_name=group) for key, pat, group in comps]
    names = sorted(groups[0])
    # What each rank sends in the plan phase: its compact report (digests and its groups' lowest
    # members), then its plan digest and, from the lowest rank of a replica set, how many
    # DEFAULT_MIN_PART_BYTES each component holds (balanced writes). Every payload is counted as
    # a set's lowest rank's: in the sized rounds of large worlds every payload is padded to the longest.
    parts = with_parts(b"", [part_counts(123_456_789_000, DEFAULT_MIN_PART_BYTES, world) if key != "rng" else 0
                             for key, _, _ in comps])
    reports = [local_report(nodes[r], groups[r], declared) for r in range(world)]
    legacy = {"node": nodes[-1], "groups": groups[-1],
              "declarations": [(k, p, g, True, False, "tensor") for k, p, g in comps]}
    del nodes, groups  # every rank's member lists exist only here, not on any rank: the GC need not walk them
    times: dict[str, list[float]] = {}

    def clock(name: str, t0: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - t0)
        return now

    def records(plans: Any) -> dict[str, dict[str, tuple[int, str, int, str]]]:  # what the writers report
        return {key: {f.path: (123_456_789, "xxh3-128:" + "0123456789abcdef" * 2, f.writer, "") for f in p.files}
                for key, p in plans.items()}

    manifest_json = ""
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        topo = agree(reports, names=names)
        t0 = clock("topology_s", t0)
        plans = plan_components(topo, declared)  # as a save without balanced writes does
        t0 = clock("plan_s", t0)
        written = records(plans)  # what the write phase hands over; not part of building the manifest
        t0 = time.perf_counter()
        save_plan = SavePlan(path="/ckpt/step-0000001000", staging="/ckpt/.staging-1000", checkpoint_id="1000",
                             sequence=1, timestamp="2025-01-01T00:00:00Z", topology=topo, components=plans)
        manifest = build_manifest(save_plan, declared, written, {})
        t0 = clock("manifest_build_s", t0)
        manifest_json = manifest.to_json()
        t0 = clock("to_json_s", t0)
        parsed = CheckpointManifest.from_json(manifest_json.encode())
        t0 = clock("from_json_s", t0)
        for key, _, _ in comps:
            parsed.components[key].file_for_rank(world - 1)
        clock("find_file_last_rank_s", t0)
        times.setdefault("topology_plan_manifest_s", []).append(
            sum(times[k][-1] for k in ("topology_s", "plan_s", "manifest_build_s", "to_json_s", "from_json_s")))
    # What the plan phase's collectives carry per rank (pickled, in exchange()'s envelope): the
    # report all-gather (with the call arguments' digest) and the plan-digest all-gather; rank 0's
    # decision is one broadcast.
    report_bytes = max(len(pickle.dumps(("ok", rep, (2**64 - 1, "")))) for rep in (reports[0], reports[-1]))
    vote = plan_vote(plan_digest(plans), parts)  # what each rank sends in the second round of a large world
    digest_bytes = len(pickle.dumps(("ok", vote, (None, ""))))
    decision_payload = ("ok", {"path": "/ckpt/step-0000001000", "staging": "/ckpt/.staging-1000",
                               "checkpoint_id": "1000", "sequence": 1, "timestamp": "2025-01-01T00:00:00Z"})
    decision_bytes = len(pickle.dumps(decision_payload))
    wire_bytes = plan_phase_wire(reports, vote, decision_payload)
    legacy_bytes = len(pickle.dumps(legacy))
    manifest_dict_bytes = len(pickle.dumps(parsed.to_dict()))
    n_files = sum(len(plans[k].files) for k, _, _ in comps)
    best = {k: min(v) for k, v in times.items()}
    return {
        "world": world, "mesh": {"dp": dims[0], "pp": dims[1], "tp": dims[2]},
        "components": len(comps), "files": n_files, "repeats": repeats,
        **best,
        "stats": {k: _stats(v) for k, v in times.items()},
        "plan_total_s": best["topology_s"] + best["plan_s"],
        "manifest_bytes": len(manifest_json.encode()),
        "plan_gather_bytes_per_rank": report_bytes,
        "plan_gather_received_per_rank": report_bytes * world,
        "plan_phase_received_per_rank": (report_bytes + digest_bytes) * world + decision_bytes,
        "plan_phase_wire_per_rank": max(wire_bytes),
        "plan_phase_wire_rank0": wire_bytes[0],
        "plan_gather_received_per_rank_before": legacy_bytes * world,
        "resolve_received_per_rank": report_bytes * world + manifest_dict_bytes,
        "manifest_pickled_bytes": manifest_dict_bytes,
    }


def plan_phase_wire(reports: list[bytes], digest: Any, decision: Any) -> list[int]:
    """Bytes every rank receives on the wire in a save's plan phase, padding included, from the
    steps TorchComm hands to gloo (:func:`distckpt.wire.lockstep`): the reports' all-gather (in
    ``exchange``'s envelope, with the call arguments' digest), rank 0's decision (a broadcast),
    the plan digests' all-gather (with the lowest ranks' part counts)."""
    from distckpt import wire

    world = len(reports)
    received = [0] * world

    def gather(payloads: list[bytes]) -> None:
        wire.lockstep([wire.gather_steps(r, world, payloads[r]) for r in range(world)], received)

    gather([pickle.dumps(("ok", rep, (2**64 - 1, "")), protocol=pickle.HIGHEST_PROTOCOL) for rep in reports])
    data = pickle.dumps(decision, protocol=pickle.HIGHEST_PROTOCOL)
    wire.lockstep([wire.broadcast_steps(r, data if r == 0 else b"") for r in range(world)], received)
    gather([pickle.dumps(("ok", digest, (None, "")), protocol=pickle.HIGHEST_PROTOCOL)] * world)
    return received


def count_collectives(world: int = 4, component_counts: tuple[int, ...] = (1, 50)) -> dict[str, Any]:
    """all_gather calls per rank for a save (plain and validated), a later save by the same
    coordinators (``save_again``: its plan phase takes one round) and a load, by component count."""
    import torch

    from distckpt import CheckpointCoordinator, StateComponent
    from distckpt.testing import ThreadComm, ThreadWorld, run_threads

    from .workloads import Holder

    calls: dict[int, int] = {}
    payload: dict[str, int] = {}
    original = ThreadComm.all_gather

    def counting(self: ThreadComm, obj: Any, phase: str) -> list[Any]:
        calls[self.rank] = calls.get(self.rank, 0) + 1
        if measure_payload:
            payload[phase] = max(payload.get(phase, 0), len(pickle.dumps(obj)))
        return original(self, obj, phase)

    measure_payload = False

    out: dict[str, Any] = {"world": world, "by_components": {}}
    ThreadComm.all_gather = counting  # type: ignore[method-assign]
    try:
        for n in component_counts:
            with tempfile.TemporaryDirectory(prefix="distckpt-bench-") as tmp:
                def comps(validate: bool, n: int = n) -> list[StateComponent]:
                    return [StateComponent(f"c{i:03d}", Holder({"w": torch.full((4,), float(i))}),
                                           "replicated", validate_replication=validate) for i in range(n)]

                row = {}
                for what in ("save", "save_validated", "save_again", "load"):
                    calls.clear()
                    again: dict[int, int] = {}

                    def fn(comm: ThreadComm, what: str = what, again: dict[int, int] = again) -> Any:
                        c = CheckpointCoordinator(comps(what == "save_validated"), dist=comm, output_dir=tmp)
                        if what == "load":
                            return c.load_checkpoint()
                        if what == "save_again":  # count the second save only
                            c.save_checkpoint(checkpoint_id="first", overwrite=True)
                            before = calls.get(comm.rank, 0)
                            c.save_checkpoint(checkpoint_id=what, overwrite=True)
                            again[comm.rank] = calls.get(comm.rank, 0) - before
                            return None
                        return c.save_checkpoint(checkpoint_id=what, overwrite=True)

                    results = run_threads(ThreadWorld(world), fn)
                    errors = [r for r in results if isinstance(r, BaseException)]
                    if errors:
                        raise errors[0]
                    per_rank = sorted(set((again or calls).values()))
                    row[what] = per_rank[0] if len(per_rank) == 1 else per_rank
                out["by_components"][n] = row
        # Bytes the largest rank contributes to each phase of a validated save of one
        # component of 10,000 tensors (the "small" workload's count), and what every
        # rank would receive at 16,384 ranks (all_gather_object pads to the largest).
        measure_payload = True
        payload.clear()
        with tempfile.TemporaryDirectory(prefix="distckpt-bench-") as tmp:
            def big_fn(comm: ThreadComm) -> Any:
                state = {"state": {i: {"exp_avg": torch.zeros(1)} for i in range(10_000)}}
                c = CheckpointCoordinator([StateComponent("optimizer", Holder(state), "replicated",
                                                          validate_replication=True)], dist=comm, output_dir=tmp)
                return c.save_checkpoint(checkpoint_id="v")

            results = run_threads(ThreadWorld(2), big_fn)
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        out["payload_10k_tensors_validated"] = dict(payload)
        out["payload_rx_per_rank_at_16384"] = {k: v * 16384 for k, v in payload.items()}
    finally:
        ThreadComm.all_gather = original  # type: ignore[method-assign]
    rows = list(out["by_components"].values())
    out["constant"] = all(r == rows[0] for r in rows)
    return out


def run(worlds: tuple[int, ...] = (1024, 16384, 65536)) -> dict[str, Any]:
    return {"plans": [plan_at_scale(w) for w in worlds], "collectives": count_collectives()}
