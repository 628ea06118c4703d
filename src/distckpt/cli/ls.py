"""``distckpt ls OUTPUT_DIR``: the checkpoints of a folder, oldest to newest, the latest marked.

Also lists every directory that cannot be loaded (incomplete, corrupt,
legacy, symlink) with the reason. Reads only (a listing may put back an old
checkpoint stranded by an interrupted overwrite, as every listing does).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import legacy, storage
from ..manifest import MANIFEST_NAME
from .arguments import EXIT_OK, CLIError
from .formatting import human_size, short, table

__all__ = ["add_parser", "classify", "run"]


def add_parser(sub: Any) -> None:
    """Register the subcommand and its help on ``sub`` (called by :func:`distckpt.cli.build_parser`)."""
    p = sub.add_parser("ls", help="list checkpoints oldest to newest, marking the latest and broken ones",
                       description="List the checkpoints of an output directory (or of its checkpoints/ "
                                   "folder) oldest to newest, marking the latest committed one and every "
                                   "incomplete or corrupt directory with the reason.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="a run's output directory or its checkpoints/ folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def classify(entry: storage.CheckpointEntry) -> tuple[str, str]:
    """(status word, reason) for a directory without a readable manifest."""
    name = os.path.basename(entry.path)
    if entry.problem == "is a symlink":
        return "skipped", "a symlink (checkpoints are never read through symlinks)"
    if name.startswith(".") and ".staging-" in name:
        return "incomplete", ("staging directory of a save in progress or one that never committed "
                              "(removed by the next save once its process is gone)")
    if name.startswith(".") and ".trash-" in name:
        return "incomplete", "being deleted (retention; removed by the next save)"
    if name.startswith(".") and ".replaced-" in name:
        return "incomplete", "old checkpoint of an interrupted overwrite (restored when its name is free)"
    if not storage.path_info(os.path.join(entry.path, MANIFEST_NAME)).exists:
        if legacy.is_legacy_checkpoint(entry.path):
            return "legacy", "original-format checkpoint; convert with `distckpt convert`"
        return "incomplete", f"no {MANIFEST_NAME} (never committed, or not a checkpoint)"
    reason = entry.problem or "unreadable manifest"
    for prefix in (os.path.join(entry.path, MANIFEST_NAME) + ": ", entry.path + ": "):
        reason = reason.removeprefix(prefix)
    return "corrupt", f"{MANIFEST_NAME}: {reason}"


def run(args: argparse.Namespace) -> int:
    """List the folder and print; the exit status. Called by :func:`distckpt.cli.main`, not
    collective; bad input raises ``CLIError`` (printed, exit status 2).
    """
    root: str = args.output_dir
    info = storage.path_info(root)
    if not info.exists:
        raise CLIError(f"{root}: no such directory")
    if not info.dir:
        raise CLIError(f"{root}: not a directory")
    if storage.path_info(os.path.join(root, MANIFEST_NAME)).file:
        raise CLIError(f"{root}: a checkpoint, not a directory of checkpoints; use `distckpt inspect {root}`")
    nested = os.path.join(root, "checkpoints")
    nested_info = storage.path_info(nested)
    parent = nested if nested_info.dir and not nested_info.link else root
    entries = storage.list_checkpoints(parent, include_hidden=True)
    committed = [e for e in entries if e.manifest is not None]
    broken = [e for e in entries if e.manifest is None]
    latest = committed[-1].path if committed else None
    if args.json:
        out = []
        for e in committed:
            m = e.manifest
            assert m is not None
            out.append({"name": os.path.basename(e.path), "path": e.path, "status": "committed",
                        "latest": e.path == latest, "checkpoint_id": m.checkpoint_id, "sequence": m.sequence,
                        "timestamp": m.timestamp, "world_size": m.world_size,
                        "components": len(m.components), "files": sum(len(c.files) for c in m.components.values()),
                        "size_bytes": sum(c.size_bytes for c in m.components.values())})
        for e in broken:
            status, reason = classify(e)
            out.append({"name": os.path.basename(e.path), "path": e.path, "status": status,
                        "latest": False, "problem": reason})
        print(json.dumps({"directory": parent, "checkpoints": out}, indent=2))
        return EXIT_OK
    if not entries:
        print(f"no checkpoints in {short(parent)}")
        return EXIT_OK
    if committed:
        rows = []
        for e in committed:
            m = e.manifest
            assert m is not None
            rows.append([
                "*" if e.path == latest else "",
                os.path.basename(e.path), m.checkpoint_id, str(m.sequence), m.timestamp, str(m.world_size),
                str(len(m.components)), str(sum(len(c.files) for c in m.components.values())),
                human_size(sum(c.size_bytes for c in m.components.values())),
                "committed, latest" if e.path == latest else "committed",
            ])
        print(f"checkpoints in {short(parent)}, oldest to newest (* = latest, what a load without a path picks):")
        print(table(["", "NAME", "ID", "SEQ", "SAVED (UTC)", "WORLD", "COMPONENTS", "FILES", "SIZE", "STATUS"],
                    rows, indent="  "))
    else:
        print(f"no committed checkpoint in {short(parent)}")
    if broken:
        print("not loadable:")
        print(table(["NAME", "STATUS", "WHY"],
                    [[os.path.basename(e.path), *classify(e)] for e in broken], indent="  "))
    return EXIT_OK
