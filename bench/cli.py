"""``python -m bench``: distckpt against the alternatives and the disk's limit (issue 5)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

from . import report
from .workloads import WORKLOADS, effective_scale, fmt_bytes

BASE_METHODS = ["physical", "distckpt", "distckpt-nohash", "distckpt-quick", "distckpt-tensor", "distckpt-full",
                "torch.save-all", "torch.save-writers", "dcp"]
VARIANT_METHODS = ["distckpt-copyload", "distckpt-bcast", "distckpt-balanced", "distckpt-whole", "distckpt-async-budget",
                   "distckpt-async-staged", "distckpt-direct"]


def has_async_save() -> bool:
    import inspect

    from distckpt import CheckpointCoordinator

    return "async_save" in inspect.signature(CheckpointCoordinator.save_checkpoint).parameters


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", type=float, default=None,
                   help="size factor of every workload (1.0 = the issue's sizes); default 0.05 (quick)")
    p.add_argument("--full", action="store_true", help="the issue's sizes (scale 1.0), capped by --mem-budget-gb")
    p.add_argument("--smoke", action="store_true", help="tiny run (< 30 s): scale 0.01, worlds 1,2, one repetition")
    p.add_argument("--worlds", default=None, help="comma-separated world sizes (default 1,2,4,8)")
    p.add_argument("--nodes", type=int, default=1,
                   help="run each world of w ranks as N nodes of w/N ranks (env GROUP_RANK) where N divides w, "
                        "else as 1 node; balanced writes only split across nodes")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--reps", type=int, default=None, help="measured repetitions per method (median reported); default 3")
    p.add_argument("--warmup", type=int, default=None,
                   help="discarded repetitions first; default 1 with --full, 0 for quick runs")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every load (needs root)")
    p.add_argument("--mem-budget-gb", type=float, default=3.0,
                   help="cap on the state held by all ranks of a world together; the per-rank size shrinks to fit")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir under $TMPDIR)")
    p.add_argument("--json", dest="json_path", default=None, help="write every number to this JSON file")
    p.add_argument("--png", dest="png_path", default=None, help="write a chart to this PNG file (needs matplotlib)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the methods (see README); default all")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the rows of distckpt with other options (load via copy, read + broadcast, "
                        "balanced writes)")
    p.add_argument("--no-protos", dest="no_variants", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-validation", action="store_true", help="skip the validation-level saves")
    p.add_argument("--no-paper", action="store_true", help="skip the in-process scale-on-paper measurement")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the in-process floor of a Python load (run when small at world 1 is measured)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also cProfile one in-process distckpt save/load of big and small; write .txt/.pstats there")
    p.add_argument("--report", default=None, metavar="JSON",
                   help="only re-render the tables, goals and --png of an earlier --json file (several, comma-separated: "
                        "their cases together, a later file's case replacing an earlier one's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed for one world")
    args = p.parse_args(argv)
    if args.smoke:
        args.scale = 0.01 if args.scale is None else args.scale
        args.worlds = args.worlds or "1,2"
        args.reps = 1 if args.reps is None else args.reps
        args.warmup = 0 if args.warmup is None else args.warmup
    if args.full and args.scale is None:
        args.scale = 1.0
    args.scale = 0.05 if args.scale is None else args.scale
    args.worlds = [int(w) for w in (args.worlds or "1,2,4,8").split(",")]
    if args.nodes < 1:
        p.error("--nodes must be >= 1")
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    args.reps = 3 if args.reps is None else args.reps
    # Quick runs skip the warm-up (the median of 3 already discards a cold first
    # repetition) to stay around a minute; --full warms up once.
    args.warmup = (1 if args.full or args.scale >= 0.5 else 0) if args.warmup is None else args.warmup
    return args


def nodes_for(world: int, nodes: int) -> int:
    """The number of nodes world ``world`` runs as: ``nodes`` where it divides the world, else 1."""
    return nodes if world >= nodes and world % nodes == 0 else 1


def environment(args: argparse.Namespace, root: str) -> dict[str, Any]:
    import torch

    import distckpt

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "distckpt": distckpt.__version__,
        "cpus": os.cpu_count(), "platform": platform.platform(), "dir": root,
        "load_before": os.getloadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import psutil

        env["memory_total"] = psutil.virtual_memory().total
    except ImportError:
        pass
    du = shutil.disk_usage(root)
    env["disk_free"] = du.free
    return env


def rerender(args: argparse.Namespace) -> int:
    """``--report A.json[,B.json...]``: the tables and goals of one run, or of several runs' cases
    together (a case measured again in a later file replaces the earlier one; the scale-on-paper
    figures come from the last file that has them)."""
    data: dict[str, Any] = {"cases": [], "paper": None, "floor": None}
    by_case: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in args.report.split(","):
        with open(path) as f:
            one = json.load(f)
        for c in one.get("cases", []):
            by_case[(c["workload"], c["world"], c.get("nodes", 1))] = c
        data["paper"] = one.get("paper") or data["paper"]
        data["floor"] = one.get("floor") or data["floor"]
        data.update({k: v for k, v in one.items() if k not in ("cases", "paper", "floor")})
    data["cases"] = list(by_case.values())
    cases = data["cases"]
    for c in cases:
        report._ratios(c)
    for c in cases:
        print(report.case_table(c))
    print(report.summary_tables(cases))
    if data.get("paper"):
        print(report.paper_table(data["paper"]))
    gs = report.goals(cases)
    g15 = report.goals15(cases, data.get("paper"), data.get("floor"))
    loads = [c["load_avg"] for c in cases if c.get("load_avg") is not None]
    print(report.goals_table(g15, "goals of issue 15 (ratios repetition by repetition)", loads or None))
    print(report.goals_table(gs))
    if args.json_path:
        data["goals"] = gs
        data["goals15"] = g15
        with open(args.json_path, "w") as f:
            json.dump(data, f, indent=1, default=str)
    if args.png_path and report.chart(cases, args.png_path):
        print(f"wrote {args.png_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report:
        return rerender(args)
    if args.profile:  # fail now, not after a 25-minute run
        if os.path.exists(args.profile) and not os.path.isdir(args.profile):
            print(f"--profile {args.profile}: exists and is not a directory", file=sys.stderr)
            return 2
        os.makedirs(args.profile, exist_ok=True)
    try:
        from distckpt.testing.pool import WorldPool, WorldSpec
    except ImportError as exc:
        print(f"bench needs distckpt's testing package (distckpt.testing.pool): {exc}", file=sys.stderr)
        return 2
    from .ranks import LOAD_FROM, drop_caches, run_case

    root = args.dir or tempfile.mkdtemp(prefix="distckpt-bench-")
    os.makedirs(root, exist_ok=True)
    env = environment(args, root)
    if args.cold and not drop_caches():
        print("--cold: cannot drop the page cache here (not root?); reads will be warm", file=sys.stderr)
        args.cold = False
    methods = list(BASE_METHODS)
    if args.no_validation:
        methods = [m for m in methods if m not in ("distckpt-quick", "distckpt-tensor", "distckpt-full")]
    methods.append("distckpt-async" if has_async_save() else "proto-async")
    if not args.no_variants:
        methods += VARIANT_METHODS
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(methods) - {"proto-async"})
        if unknown:
            print(f"--methods: unknown {unknown}; choose from {methods}", file=sys.stderr)
            return 2
        methods = [m for m in [*methods, "proto-async"] if m in wanted]
        orphans = sorted(m for m in methods if LOAD_FROM.get(m, m) not in methods)
        if orphans:
            print(f"--methods: {orphans} load the checkpoint of {sorted({LOAD_FROM[m] for m in orphans})}; "
                  "add it", file=sys.stderr)
            return 2
    print(f"distckpt bench: scale={args.scale:g} worlds={args.worlds} nodes={args.nodes} "
          f"workloads={args.workloads} "
          f"reps={args.reps} (+{args.warmup} warm-up, medians of the slowest rank) "
          f"reads={'cold (page cache dropped)' if args.cold else 'warm (page cache)'}")
    print(f"machine: {env['cpus']} cpus, torch {env['torch']}, load average {env['load_before'][0]:.2f}, "
          f"checkpoints in {root} ({fmt_bytes(env['disk_free'])} free); memory budget "
          f"{args.mem_budget_gb:g} GB of state per world", flush=True)
    cases: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    started = time.perf_counter()
    with WorldPool(max_ranks=max(args.worlds)) as pool:
        pool.warm_up(max(args.worlds))
        for workload in args.workloads:
            for world in args.worlds:
                scale = effective_scale(workload, world, args.scale, args.mem_budget_gb * 1e9)
                cfg = {"workload": workload, "scale": scale, "reps": args.reps, "warmup": args.warmup,
                       "cold": args.cold, "methods": methods, "root": root}
                nodes = nodes_for(world, args.nodes)
                t0 = time.perf_counter()
                try:
                    ranks = pool.run_ok(WorldSpec(nodes=nodes, procs_per_node=world // nodes), run_case, cfg,
                                        timeout=args.timeout)
                except Exception as exc:  # a rank killed (out of memory, say) costs this case, not the run
                    failed.append({"workload": workload, "world": world, "error": str(exc)[-2000:],
                                   "load_avg": os.getloadavg()[0]})
                    print(f"== {workload} world={world}: FAILED, skipped ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                          f"load average {os.getloadavg()[0]:.2f}", flush=True)
                    continue
                case = report.aggregate(workload, world, nodes, scale, args.warmup, ranks)
                case["wall_s"] = time.perf_counter() - t0
                case["load_avg"] = os.getloadavg()[0]
                cases.append(case)
                print(report.case_table(case) + f"\n   ({case['wall_s']:.1f} s, load average {case['load_avg']:.2f})",
                      flush=True)
                if args.json_path:  # after every case, so a run cut short keeps what it measured
                    _write_json(args, {"environment": env, "cases": cases, "failed": failed, "partial": True})
    gs = report.goals(cases)
    print(report.summary_tables(cases))
    paper = None
    if not args.no_paper:
        from . import paper as paper_mod

        paper = paper_mod.run((1024,) if args.smoke else (1024, 16384, 65536))
        print(report.paper_table(paper))
    floor = None
    if not args.no_floor and any(c["workload"] == "small" and c["world"] == 1 for c in cases):
        from . import micro

        try:  # in this process, from the page cache (also with --cold): a floor, shown and not judged
            floor = micro.load_floor(effective_scale("small", 1, args.scale, args.mem_budget_gb * 1e9),
                                     reps=max(5, 3 * args.reps), out_dir=args.dir)
        except Exception as exc:  # the tables and the JSON of the cases matter more than the floor
            print(f"\nthe floor of a Python load failed, and is left out: {type(exc).__name__}: {exc}")
        else:
            print()
            micro.print_floor(floor)
    g15 = report.goals15(cases, paper, floor)
    print(report.goals_table(g15, "goals of issue 15 (ratios repetition by repetition)",
                             [c["load_avg"] for c in cases]))
    print(report.goals_table(gs))
    profiles = []
    if args.profile:
        from .profiling import profile

        for w in ("big", "small"):
            prof = profile(w, effective_scale(w, 1, args.scale, args.mem_budget_gb * 1e9), args.profile)
            profiles.append(prof)
            for what in ("save", "load"):
                print(f"\n== cProfile: distckpt {what} of {w} (world 1, in-process, {prof[what]['wall_s']:.3f} s)")
                print("\n".join(prof[what]["top_tottime"]))
    env["load_after"] = os.getloadavg()
    env["wall_s"] = time.perf_counter() - started
    print(f"\ntotal {env['wall_s']:.1f} s; load average before {env['load_before'][0]:.2f}, after "
          f"{env['load_after'][0]:.2f} (other work on this machine makes timings noisy: compare ratios)")
    if failed:
        print(f"{len(failed)} case(s) FAILED and are missing from the tables: "
              + ", ".join(f"{f['workload']}/w{f['world']}" for f in failed))
    if args.json_path:
        _write_json(args, {"environment": env, "cases": cases, "failed": failed, "goals": gs, "goals15": g15,
                           "paper": paper, "floor": floor, "profiles": profiles})
        print(f"wrote {args.json_path}")
    if args.png_path:
        if report.chart(cases, args.png_path):
            print(f"wrote {args.png_path}")
        else:
            print("--png: matplotlib is not installed; no chart (pip install -c constraints.txt matplotlib)")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


def _write_json(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """The run's JSON (``--json``), replaced whole (written beside it, then renamed)."""
    tmp = args.json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"args": dict(vars(args)), **data}, f, indent=1, default=str)
    os.replace(tmp, args.json_path)
