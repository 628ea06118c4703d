"""``distckpt diff A B``: the components, entries and tensors that differ between two checkpoints.

Prints the report of :func:`distckpt.diff_checkpoints`. Imports torch (to
decode the files it compares) only when it runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError
from .arguments import EXIT_FOUND, EXIT_OK, CLIError, load_checkpoint_dir
from .formatting import rank_text, sets_text, short

if TYPE_CHECKING:
    from ..comparison import ComponentDiff

__all__ = ["add_parser", "component_lines", "run"]


def add_parser(sub: Any) -> None:
    """Register the subcommand and its help on ``sub`` (called by :func:`distckpt.cli.build_parser`)."""
    p = sub.add_parser("diff", help="components, entries and tensors that differ between two checkpoints",
                       description="Compare two checkpoints file by file: components, entries and tensors that "
                                   "differ, with the largest absolute difference for tensors. Exit status 1 "
                                   "when they differ.")
    p.add_argument("a", metavar="A", help="the first checkpoint directory")
    p.add_argument("b", metavar="B", help="the second checkpoint directory")
    p.add_argument("--max-entries", type=int, default=20, metavar="N",
                   help="differing entries shown per file (0: all; default 20)")
    p.set_defaults(func=run)


def component_lines(d: ComponentDiff, limit: int) -> list[str]:
    """The indented lines under ``component 'KEY' (PATTERN):`` for one differing component."""
    if d.pattern_a != d.pattern_b:
        return [f"  pattern: {d.pattern_a} in A, {d.pattern_b} in B (files not compared)"]
    lines: list[str] = []
    if d.replica_sets_a != d.replica_sets_b:
        lines.append(f"  replica sets: {sets_text(d.replica_sets_a)} in A, {sets_text(d.replica_sets_b)} in B")
    for f in d.files:
        if f.only_in is not None:
            lines.append(f"  {f.path}: only in {f.only_in}")
            continue
        if f.ranks_a != f.ranks_b:
            lines.append(f"  {f.path}: ranks {rank_text(f.ranks_a)} in A, {rank_text(f.ranks_b)} in B")
        if not f.entries:
            continue
        n = len(f.entries)
        lines.append(f"  {f.path} (ranks {rank_text(f.ranks_a)}): {n} entr{'y differs' if n == 1 else 'ies differ'}")
        shown = f.entries if limit <= 0 else f.entries[:limit]
        lines += [f"    {e}" for e in shown]
        if len(shown) < n:
            lines.append(f"    ... and {n - len(shown)} more (--max-entries 0 shows all)")
    return lines


def run(args: argparse.Namespace) -> int:
    """Compare the two checkpoints and print; the exit status. Called by :func:`distckpt.cli.main`, not
    collective; bad input raises ``CLIError`` (printed, exit status 2).
    """
    from ..comparison import diff_checkpoints  # imports torch: only this command needs it

    pa, _ = load_checkpoint_dir(args.a)  # the CLI's messages for a path that is not a checkpoint
    pb, _ = load_checkpoint_dir(args.b)
    try:
        report = diff_checkpoints(pa, pb)
    except IntegrityError as exc:
        raise CLIError(str(exc)) from None
    print(f"A: {short(report.a)} (id {report.checkpoint_id_a}, world {report.world_size_a})")
    print(f"B: {short(report.b)} (id {report.checkpoint_id_b}, world {report.world_size_b})")
    if report.world_size_a != report.world_size_b:
        print(f"world size: {report.world_size_a} in A, {report.world_size_b} in B")
    for d in report.differences:
        pattern = d.pattern_a if d.pattern_a is not None else d.pattern_b
        if d.only_in is not None:
            print(f"component {d.key!r} ({pattern}): only in {d.only_in}")
            continue
        print(f"component {d.key!r} ({pattern}):")
        print("\n".join(component_lines(d, args.max_entries)))
    if not report.same:
        print(f"DIFFERENT: {len(report.differences)} of {len(report.components)} components differ")
        return EXIT_FOUND
    print(f"same state: {len(report.components)} components, {report.files_a} files")
    return EXIT_OK
