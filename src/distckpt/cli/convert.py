"""``distckpt convert SRC DST``: an original-format checkpoint rewritten as a distckpt checkpoint.

The plan (each component's pattern, replica sets and source files) comes from
:func:`distckpt.legacy.plan_conversion`; this module turns the layout options
into a :class:`~distckpt.topology.Topology`, then writes the new checkpoint
through :mod:`distckpt.storage` (staging, checksums, commit): ``DST`` appears
whole or not at all, and ``SRC`` is never touched. ``convert --to-torch`` is
:mod:`distckpt.cli.export`. torch is imported only when a conversion runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .. import folder, legacy, series, storage
from ..errors import CheckpointError, TopologyMismatchError
from ..hashing import checksum_of
from ..manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest, FileEntry
from ..names import check_name
from ..topology import Partition, Topology
from ..version import __version__
from . import export
from .arguments import EXIT_OK, CLIError
from .formatting import human_size, sets_text, short, table

__all__ = ["add_parser", "mesh_partitions", "parse_partition", "parse_ranks", "run"]

log = logging.getLogger("distckpt")


def add_parser(sub: Any) -> None:
    """Register the subcommand and its help on ``sub`` (called by :func:`distckpt.cli.build_parser`)."""
    p = sub.add_parser(
        "convert", help="original-format checkpoint -> distckpt; or --to-torch: one rank's view as a torch file",
        description="convert SRC DST: rewrite a checkpoint of the original implementation (*_state*.pt files) "
                    "as a distckpt checkpoint with a manifest and checksums; files are read with "
                    "torch.load(weights_only=True) only. convert --to-torch FILE --rank R CHECKPOINT: write "
                    "what rank R would load from CHECKPOINT as one torch.save file {component: state}.",
        usage="distckpt convert [options] SRC DST\n       distckpt convert --to-torch FILE --rank R [--force] CHECKPOINT",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="SRC DST: the original-format checkpoint directory (read only) and the new checkpoint "
                        "directory to create (must not exist); with --to-torch: the one CHECKPOINT to export")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="ranks of the job that saved SRC (default: from checkpoint_manifest.json or the layout)")
    p.add_argument("--mesh", metavar="NAME=SIZE,...",
                   help="the job's row-major device mesh, e.g. dp=2,tp=4: its dimensions become the groups")
    p.add_argument("--group", action="append", metavar="NAME=SETS",
                   help="a group partition, sets split by '/', e.g. dp=0,4/1,5/2,6/3,7 (repeatable)")
    p.add_argument("--nproc-per-node", type=int, metavar="N", help="nodes hold N contiguous ranks (torchrun)")
    p.add_argument("--nodes", metavar="SETS", help="explicit nodes, e.g. 0-3/4-7")
    p.add_argument("--pattern", action="append", metavar="KEY=PATTERN",
                   help="global or replicated for a shared <key>_state.pt (default: as checkpoint_manifest.json "
                        "says, else global)")
    p.add_argument("--checkpoint-id", metavar="ID", help="default: DST's name without 'checkpoint-'")
    p.add_argument("--sequence", type=int, metavar="N",
                   help="order among DST's siblings (default: one more than the newest there)")
    p.add_argument("--to-torch", metavar="FILE", help="export one rank's view of CHECKPOINT to FILE")
    p.add_argument("--rank", type=int, metavar="R", help="with --to-torch: whose view")
    p.add_argument("--force", action="store_true", help="with --to-torch: replace FILE if it exists")
    p.set_defaults(func=run)


def parse_ranks(text: str) -> tuple[int, ...]:
    """``0,4`` or ``0-3`` or ``0-2,7`` -> sorted ranks; ``ValueError`` otherwise."""
    ranks: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            lo, hi = int(m[1]), int(m[2])
            if hi < lo:
                raise ValueError(f"empty rank range {part!r}")
            ranks.update(range(lo, hi + 1))
        elif part.isdigit():
            ranks.add(int(part))
        else:
            raise ValueError(f"{part!r} is not a rank or a range like 0-3")
    return tuple(sorted(ranks))


def parse_partition(text: str) -> Partition:
    """``0,4/1,5/2,6/3,7`` -> ((0, 4), (1, 5), (2, 6), (3, 7))."""
    return tuple(parse_ranks(s) for s in text.split("/"))


def mesh_partitions(dims: Sequence[tuple[str, int]]) -> dict[str, Partition]:
    """Groups of a row-major device mesh (``init_device_mesh`` order): for each
    dimension, the sets of ranks that differ only in that coordinate."""
    sizes = [size for _, size in dims]
    world = math.prod(sizes)
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    out: dict[str, Partition] = {}
    for d, (name, size) in enumerate(dims):
        sets = {}
        for rank in range(world):
            coord = (rank // strides[d]) % size
            base = rank - coord * strides[d]
            sets[base] = tuple(base + i * strides[d] for i in range(size))
        out[name] = tuple(sorted(sets.values()))
    return out


def _parse_mesh(text: str) -> list[tuple[str, int]]:
    dims = []
    for part in text.split(","):
        name, sep, size = part.partition("=")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise CLIError(f"--mesh: {part!r} is not NAME=SIZE (e.g. --mesh dp=2,tp=4)")
        dims.append((name.strip(), int(size)))
    return dims


def _conversion_topology(args: argparse.Namespace, hints: Mapping[str, Any]) -> tuple[Topology, bool]:
    groups: dict[str, Partition] = {}
    if args.mesh:
        groups.update(mesh_partitions(_parse_mesh(args.mesh)))
    for spec in args.group or []:
        name, sep, sets = spec.partition("=")
        if not sep:
            raise CLIError(f"--group: {spec!r} is not NAME=SETS (e.g. --group dp=0,4/1,5/2,6/3,7)")
        try:
            groups[name.strip()] = parse_partition(sets)
        except ValueError as exc:
            raise CLIError(f"--group {name}: {exc}") from None
    world = args.world_size
    if world is None and isinstance(hints.get("world_size"), int) and not isinstance(hints["world_size"], bool):
        world = hints["world_size"]
    if world is None and groups:
        world = max(r for part in groups.values() for s in part for r in s) + 1
    if world is None and args.nproc_per_node is None and args.nodes:
        try:
            world = max(parse_ranks(args.nodes.replace("/", ","))) + 1
        except ValueError as exc:
            raise CLIError(f"--nodes: {exc}") from None
    if world is None:
        raise CLIError("pass --world-size N: the number of ranks of the job that saved this checkpoint "
                       "(legacy file names do not record it)")
    if world < 1:
        raise CLIError("--world-size must be positive")
    nodes: Partition = (tuple(range(world)),)
    nodes_given = False
    if args.nproc_per_node is not None:
        n = args.nproc_per_node
        if n < 1 or world % n:
            raise CLIError(f"--nproc-per-node {n} does not divide the world of {world} ranks")
        nodes = tuple(tuple(range(i, i + n)) for i in range(0, world, n))
        nodes_given = True
    elif args.nodes:
        try:
            nodes = parse_partition(args.nodes)
        except ValueError as exc:
            raise CLIError(f"--nodes: {exc}") from None
        nodes_given = True
    try:
        return Topology(world, nodes, groups), nodes_given
    except (TopologyMismatchError, ValueError) as exc:
        raise CLIError(f"the layout given is not valid for a world of {world} ranks: {exc}") from None


def _checked_name(value: str, field: str) -> None:
    try:
        check_name(value, field_name=field)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Convert (or export, with --to-torch) and print; the exit status. Called by :func:`distckpt.cli.main`, not
    collective; bad input raises ``CLIError`` (printed, exit status 2).
    """
    if args.to_torch is not None:
        return export.run(args)
    if len(args.paths) != 2:
        raise CLIError("expected SRC DST (or --to-torch FILE --rank R CHECKPOINT)")
    src, dst = args.paths
    src_info = storage.path_info(src)
    if not src_info.dir:
        raise CLIError(f"{src}: no such directory" if not src_info.exists else f"{src}: not a directory")
    if storage.path_info(os.path.join(src, MANIFEST_NAME)).exists:
        raise CLIError(f"{src}: already a distckpt checkpoint (it has {MANIFEST_NAME}); nothing to convert")
    files = legacy.legacy_inventory(src)
    if not files:
        raise CLIError(f"{src}: no original-format files (<key>_state.pt, <key>_state_rank_<r>.pt, ...) in it")
    final = os.path.abspath(dst)
    if storage.path_info(final).exists:
        raise CLIError(f"{dst}: already exists; choose a new directory")
    _checked_name(os.path.basename(final), "DST directory name")
    overrides: dict[str, str] = {}
    for spec in args.pattern or []:
        key, sep, value = spec.partition("=")
        if not sep or not value:
            raise CLIError(f"--pattern {spec!r}: expected KEY=PATTERN")
        overrides[key] = value.lower()
    unknown = sorted(set(overrides) - {f.key for f in files})
    if unknown:
        raise CLIError(f"--pattern: no component {unknown} in {src}")
    hints = legacy.read_legacy_hints(src)
    topology, nodes_given = _conversion_topology(args, hints)
    try:
        planned = legacy.plan_conversion(files, topology, overrides, hints, nodes_given)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    name = os.path.basename(final)
    cid = args.checkpoint_id or (name.removeprefix("checkpoint-") if name.startswith("checkpoint-") and
                                 len(name) > len("checkpoint-") else name)
    _checked_name(cid, "--checkpoint-id")
    components = _write(src, final, planned, topology, cid, args.sequence)
    total = sum(c.size_bytes for c in components.values())
    print(f"converted {short(src)} -> {short(final)}: {len(components)} components, "
          f"{sum(len(c.files) for c in components.values())} files, {human_size(total)}, world {topology.world_size}")
    print(table(["COMPONENT", "PATTERN", "REPLICA SETS", "FROM"],
                [[p.key, p.pattern.describe(), sets_text(p.plan.replica_sets),
                  ", ".join(p.sources[f.path] for f in p.plan.files)] for p in planned], indent="  "))
    return EXIT_OK


def _write(src: str, final: str, planned: Sequence[legacy.ConversionStep], topology: Topology, cid: str,
           sequence: int | None) -> dict[str, ComponentManifest]:
    """Write the converted checkpoint through a staging directory; ``final`` appears whole or not at all."""
    import torch  # only a conversion that runs needs it (to read the legacy files and record its version)

    from .. import codec

    if sequence is None:
        parent = os.path.dirname(final)
        sequence = max(series.committed_sequences(parent), default=0) + 1
    staging = folder.create_staging(final, uuid.uuid4().hex[:12], sequence)
    try:
        components: dict[str, ComponentManifest] = {}
        origin: dict[str, str] = {}
        for p in planned:
            entries = []
            storage.make_component_dir(staging, p.key)
            for fp in p.plan.files:
                legacy_name = p.sources[fp.path]
                state = legacy.read_legacy_file(os.path.join(src, legacy_name))
                encoded = codec.encode(state)
                size, checksum = storage.write_file(os.path.join(staging, fp.path), encoded.chunks())
                entries.append(FileEntry(fp.path, fp.ranks, fp.writer, size, checksum))
                origin[fp.path] = legacy_name
                log.info("distckpt: converted %s -> %s (%d bytes)", legacy_name, fp.path, size)
            components[p.key] = ComponentManifest(
                key=p.key, sharing_pattern=p.pattern.kind, group_name=p.group, params=p.pattern.params(),
                ranks=p.plan.writers,
                replicated_across=p.plan.replica_sets, files=tuple(entries), required=True, validation=None,
                size_bytes=sum(e.size_bytes for e in entries),
                checksum=checksum_of("\n".join(e.checksum for e in entries).encode()),
            )
            storage.fsync_dir(os.path.join(staging, p.key))
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        manifest = CheckpointManifest(
            checkpoint_id=cid, world_size=topology.world_size, timestamp=stamp, components=components,
            topology=topology.to_dict(), sequence=sequence, library_version=__version__,
            pytorch_version=torch.__version__,
            extra={"converted_from": {"format": "original", "path": os.path.abspath(src), "files": origin}},
        )
        manifest.save(os.path.join(staging, MANIFEST_NAME))
        storage.fsync_dir(staging)
        folder.commit_directory(staging, final, overwrite=False)
    except BaseException:
        folder.discard_staging(staging)
        raise
    return components
