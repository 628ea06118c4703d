"""``python -m harness run scenarios/``: the main job (also the ``distckpt-harness`` script).

Runs every scenario in simulated multi-node gloo worlds on this machine, prints
one table row per scenario and exits non-zero if any scenario falls short.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from harness.report import format_problems, format_row, format_summary, table_header
from harness.scenario import check_paths

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Checkpoint/resume scenarios for distckpt in simulated multi-node worlds.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run scenario files (or directories of them)")
    run.add_argument("paths", nargs="+", help="scenario .toml files or directories")
    run.add_argument("--workdir", help="keep checkpoints in DIR/<scenario>/checkpoints/")
    run.add_argument("--json", dest="json_path", metavar="FILE", help="write results as JSON")
    run.add_argument(
        "-k", dest="select", metavar="TEXT", help="only scenarios whose name contains TEXT"
    )
    check = sub.add_parser("check", help="parse and validate scenario files without running them")
    check.add_argument("paths", nargs="+")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 when every scenario met its expectation)."""
    args = _parser().parse_args(argv)
    scenarios, errors = check_paths(args.paths)
    if errors:
        for message in errors:
            print(f"error: {message}", file=sys.stderr)
        bad = len({m.split(": ", 1)[0] for m in errors})
        print(f"{bad} bad scenario file{'s' if bad != 1 else ''}", file=sys.stderr)
        return 2
    if args.command == "check":
        for s in scenarios:
            print(f"{s.name}: {s.trainer} {s.describe_world()} ok")
        return 0
    if args.select:
        scenarios = [s for s in scenarios if args.select in s.name]
    if not scenarios:
        print("error: no scenarios to run", file=sys.stderr)
        return 2
    from distckpt.testing.pool import WorldPool
    from harness.runner import run_scenarios

    started = time.perf_counter()
    max_ranks = max(max(s.topology.world_size, s.resume_topology.world_size) for s in scenarios)
    width = max(len(s.name) for s in scenarios)
    print(table_header(width), flush=True)
    with WorldPool(max_ranks=max_ranks) as pool:
        results = []
        # Progress goes to stderr and the table to stdout. On a terminal the progress line is
        # transient (rewritten in place, erased before each row) so the table stays readable.
        transient = sys.stderr.isatty() and sys.stdout.isatty()

        def show_row(result: Any) -> None:
            if transient:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
            print(format_row(result, width), flush=True)

        for index, scenario in enumerate(scenarios, 1):
            line = f"[{index}/{len(scenarios)}] {scenario.name}: {scenario.trainer} {scenario.describe_world()} ..."
            sys.stderr.write(line if transient else line + "\n")
            sys.stderr.flush()
            results += run_scenarios(pool, [scenario], args.workdir, on_result=show_row)
    elapsed = time.perf_counter() - started
    problems = format_problems(results)
    if problems:
        print(problems)
    print(format_summary(results, elapsed))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(
                {"seconds": elapsed, "scenarios": [r.to_json() for r in results]}, f, indent=2
            )
    return 0 if all(r.met for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
