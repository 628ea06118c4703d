"""Layout: which file each replica set is written to, and by whom.

Pure module. Given a topology and a declaration, :func:`plan_component` lists
one :class:`FilePlan` per replica set: its relative path inside the checkpoint
directory, the ranks it belongs to and its writer (always the lowest rank of the
set). Loading never parses these names; it finds a rank's file through the
manifest. :func:`check_relpath` is the one place that says whether a relative
path may be joined to a checkpoint directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .patterns import SharingPattern
from .topology import Topology, replica_sets

__all__ = [
    "FILE_SUFFIX",
    "ComponentPlan",
    "FilePlan",
    "check_relpath",
    "file_name",
    "plan_component",
]

FILE_SUFFIX = ".safetensors"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


@dataclass(frozen=True)
class FilePlan:
    """One file of a component: where it goes, whose state it holds, who writes it."""

    path: str
    ranks: tuple[int, ...]
    writer: int


@dataclass(frozen=True)
class ComponentPlan:
    """Every file of one component, ordered by replica set."""

    key: str
    pattern: SharingPattern
    group_name: str | None
    files: tuple[FilePlan, ...]

    @property
    def writers(self) -> tuple[int, ...]:
        return tuple(sorted(f.writer for f in self.files))

    @property
    def replica_sets(self) -> tuple[tuple[int, ...], ...]:
        return tuple(f.ranks for f in self.files)


def file_name(pattern: SharingPattern, index: int, writer: int, group_name: str | None) -> str:
    """File name (without directory) of replica set ``index`` of a component."""
    if pattern is SharingPattern.GLOBAL:
        stem = "global"
    elif pattern is SharingPattern.REPLICATED:
        stem = "replicated"
    elif pattern is SharingPattern.PER_RANK:
        stem = f"rank-{writer:05d}"
    elif pattern is SharingPattern.PER_NODE:
        stem = f"node-{index:03d}"
    else:
        stem = f"{group_name}-{index:03d}"
    return stem + FILE_SUFFIX


def plan_component(
    topology: Topology, key: str, pattern: SharingPattern, group_name: str | None
) -> ComponentPlan:
    """Plan the files of one component; raises ``TopologyMismatchError`` for an unknown group."""
    files = tuple(
        FilePlan(path=f"{key}/{file_name(pattern, i, min(members), group_name)}",
                 ranks=members, writer=min(members))
        for i, members in enumerate(replica_sets(topology, pattern, group_name))
    )
    return ComponentPlan(key=key, pattern=pattern, group_name=group_name, files=files)


def check_relpath(relpath: str) -> str:
    """Return ``relpath`` if it is ``<name>/<name>`` with safe names; else ``ValueError``.

    Used on every path read from a manifest before it is joined to a directory,
    so that no manifest can point outside its checkpoint.
    """
    parts = relpath.split("/")
    if len(parts) != 2 or any(p in (".", "..") or _SEGMENT.fullmatch(p) is None for p in parts):
        raise ValueError(f"unsafe file path {relpath!r} in manifest; expected '<key>/<file>'")
    return relpath
