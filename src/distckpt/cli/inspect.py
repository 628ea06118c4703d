"""``distckpt inspect CHECKPOINT``: components, patterns, writers, files and topology of a checkpoint.

Also describes an original-format checkpoint from its file names. Reads only
the manifest (never a data file).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from .. import legacy, storage
from ..manifest import MANIFEST_NAME, CheckpointManifest
from .arguments import EXIT_OK, load_checkpoint_dir
from .formatting import human_size, rank_text, sets_text, short, table

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Register the subcommand and its help on ``sub`` (called by :func:`distckpt.cli.build_parser`)."""
    p = sub.add_parser("inspect", help="components, patterns, writers, files and topology of a checkpoint",
                       description="Show what a checkpoint holds: each component's pattern, group, writers, "
                                   "replica sets, files, size and validation, and the topology it was saved with.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (or its manifest.json)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--files", action="store_true", help="also list every file with its ranks and checksum")
    p.set_defaults(func=run)


def _ints(value: Any) -> bool:
    """A list of rank numbers (what a hostile manifest's topology may not be)."""
    return isinstance(value, list) and all(type(r) is int for r in value)


def _topology_lines(m: CheckpointManifest) -> list[tuple[str, str]]:
    out = []
    nodes = m.topology.get("nodes")
    if isinstance(nodes, list) and nodes:
        text = "; ".join(f"node {i} = ranks {rank_text(n)}" for i, n in enumerate(nodes) if _ints(n))
        out.append(("nodes", f"{len(nodes)}: {text}"))
    groups = m.topology.get("groups")
    if isinstance(groups, dict):
        for name, part in sorted(groups.items()):
            if isinstance(part, list) and all(_ints(s) for s in part):
                out.append((f"group {name}", sets_text(part, limit=200)))
    return out


def run(args: argparse.Namespace) -> int:
    """Describe the checkpoint and print; the exit status. Called by :func:`distckpt.cli.main`, not
    collective; bad input raises ``CLIError`` (printed, exit status 2).
    """
    if storage.path_info(args.checkpoint).dir \
            and not storage.path_info(os.path.join(args.checkpoint, MANIFEST_NAME)).exists \
            and legacy.is_legacy_checkpoint(args.checkpoint):
        return _inspect_legacy(args)
    path, m = load_checkpoint_dir(args.checkpoint)
    if args.json:
        print(json.dumps({"path": os.path.abspath(path), "manifest": m.to_dict()}, indent=2))
        return EXIT_OK
    total = sum(c.size_bytes for c in m.components.values())
    nfiles = sum(len(c.files) for c in m.components.values())
    header = [
        ("checkpoint", short(path)),
        ("id", f"{m.checkpoint_id} (sequence {m.sequence})"),
        ("saved", f"{m.timestamp} by distckpt {m.library_version or '?'}, torch {m.pytorch_version or '?'} "
                  f"(format {m.format_version})"),
        ("world", f"{m.world_size} rank{'s' if m.world_size != 1 else ''}"),
        *_topology_lines(m),
        ("contents", f"{len(m.components)} components, {nfiles} files, {human_size(total)} ({total} bytes)"),
    ]
    width = max(len(k) for k, _ in header)
    for k, v in header:
        print(f"{k.ljust(width)}  {v}")
    print()
    rows = []
    for key in sorted(m.components):
        c = m.components[key]
        rows.append([
            key, c.describe_pattern(), rank_text(c.ranks),
            sets_text(c.replicated_across), str(len(c.files)), human_size(c.size_bytes),
            c.validation or "-", "yes" if c.required else "no",
        ])
    print(table(["COMPONENT", "PATTERN", "WRITERS", "REPLICA SETS", "FILES", "SIZE", "VALIDATION", "REQUIRED"], rows))
    if args.files:
        print()
        file_rows = []
        for key in sorted(m.components):
            for f in m.components[key].files:
                file_rows.append([f.path, rank_text(f.ranks), str(f.writer), str(f.size_bytes), f.checksum])
        print(table(["FILE", "RANKS", "WRITER", "BYTES", "CHECKSUM"], file_rows))
    if m.extra:
        print()
        print("other manifest fields: " + ", ".join(sorted(m.extra)))
    return EXIT_OK


def _inspect_legacy(args: argparse.Namespace) -> int:
    path: str = args.checkpoint
    files = legacy.legacy_inventory(path)
    if args.json:
        print(json.dumps({"path": os.path.abspath(path), "format": "original", "files": [
            {"name": f.name, "key": f.key, "kind": f.kind, "writer": f.writer, "group": f.group, "node": f.node}
            for f in files]}, indent=2))
        return EXIT_OK
    print(f"{short(path)}: a checkpoint of the original implementation (no {MANIFEST_NAME}, no checksums)")
    print(f"convert it with `distckpt convert {path} NEW_CHECKPOINT_DIR` (see docs/migration.md)")
    print()
    kinds = {"shared": "global/replicated", "rank": "per_rank", "group": "per_group", "node": "per_node"}
    rows = []
    for f in files:
        where = f"group {f.group}" if f.group else (f"node {f.node}" if f.node is not None else "")
        size = storage.path_info(os.path.join(path, f.name)).size
        rows.append([f.key, kinds[f.kind], "" if f.writer is None else str(f.writer), where, human_size(size), f.name])
    print(table(["COMPONENT", "PATTERN (from name)", "WRITER", "SET", "SIZE", "FILE"], rows))
    return EXIT_OK
