"""``distckpt verify CHECKPOINT``: every size and checksum against the manifest; exit 0 only if intact.

Prints the report of :func:`distckpt.verify_checkpoint` (the library does the
checking), with a progress line on a terminal for large checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..verification import verify_checkpoint
from .arguments import EXIT_FOUND, EXIT_OK, load_checkpoint_dir
from .formatting import Progress, human_size, short

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the subcommand and its help on ``sub`` (called by :func:`distckpt.cli.build_parser`)."""
    p = sub.add_parser("verify", help="recompute every size and checksum; exit 0 only if intact",
                       description="Recompute every file's size and checksum and compare them with the "
                                   "manifest; report missing, damaged and unlisted files. Exit status 0 only "
                                   "if the checkpoint is intact.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (or its manifest.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems; no progress")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify the checkpoint and print; the exit status. Called by :func:`distckpt.cli.main`, not
    collective; bad input raises ``CLIError`` (printed, exit status 2).
    """
    path, m = load_checkpoint_dir(args.checkpoint)
    total = sum(c.size_bytes for c in m.components.values())
    progress = Progress(total, sys.stderr, enabled=sys.stderr.isatty() and not args.quiet)
    try:
        report = verify_checkpoint(path, manifest=m, progress=progress.add)
    finally:
        progress.close()
    if report.problems:
        for p in report.problems:
            print(p)
        bad_files = sorted({p.path for p in report.problems if p.what != "manifest"})
        n = len(report.problems)
        print(f"NOT INTACT: {short(path)}: {n} problem{'s' if n != 1 else ''}"
              + (f" ({len(bad_files)} file{'s' if len(bad_files) != 1 else ''}: {', '.join(bad_files)})"
                 if bad_files else ""))
        return EXIT_FOUND
    if not args.quiet:
        print(f"intact: {short(path)}: {report.files} files, {human_size(report.size_bytes)}; every size and "
              "checksum matches the manifest and no file is unlisted")
    return EXIT_OK
