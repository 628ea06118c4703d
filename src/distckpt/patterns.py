"""Sharing patterns: a pattern is a partition of the world's ranks into replica sets.

Pure module (no I/O, no collectives). Ranks of one replica set hold the same
state, different sets hold different state; one file is written per set, by
its lowest rank. A pattern is any deterministic function from a
:class:`~distckpt.topology.Topology` to such a partition, plus two flags:

- ``identical_replicas``: members of a set hold identical state, so the set may
  be validated (digests compared) and written in parts by several members;
- ``elastic``: the state loads into a world of another size.

Write one by subclassing :class:`Pattern`, give it a ``kind`` and register it
with :func:`register_pattern`; the manifest records ``{"kind", "params"}`` and
:func:`pattern_from_record` rebuilds it in the loading process. The five
built-ins are classes like any other; :class:`SharingPattern` keeps the
original enum names as aliases of them. ``docs/patterns.md`` is the guide.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from enum import Enum
from operator import itemgetter
from typing import Any, ClassVar, TypeVar

from .names import check_name, coerce_enum
from .topology import Partition, Topology, check_partition, join_partitions

__all__ = [
    "Global",
    "Pattern",
    "PerGroup",
    "PerNode",
    "PerRank",
    "Replicated",
    "SharingPattern",
    "pattern_from_record",
    "register_pattern",
    "registered_patterns",
    "resolve_pattern",
]

KIND_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}")
P = TypeVar("P", bound="type[Pattern]")
_REGISTRY: dict[str, type[Pattern]] = {}


class Pattern:
    """Base class of every sharing pattern: a partition of the world into replica sets.

    Subclasses set ``kind`` (the registry key written in the manifest,
    ``[a-z][a-z0-9_]{0,63}``) and implement :meth:`replica_sets`. Instances
    are values: two patterns are equal when their kind and params are.

    The rules a pattern must keep (``distckpt.testing.check_pattern`` checks
    them): :meth:`replica_sets` is pure and deterministic, gives the same
    answer on every rank, and partitions ``range(topology.world_size)``;
    ``cls(**params())`` rebuilds an equal instance; params are plain JSON.
    """

    kind: ClassVar[str] = ""
    #: Members of a set hold identical state: validation and balanced writes are allowed.
    identical_replicas: ClassVar[bool] = True
    #: The saved state loads into a world of another size (every rank reads set 0's file
    #: when its own rank is in no saved set).
    elastic: ClassVar[bool] = False
    #: The original implementation's file kind for this pattern ("shared", "rank",
    #: "group", "node"); ``None`` when that format had no such pattern.
    legacy_kind: ClassVar[str | None] = None

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        """The replica sets of this pattern in ``topology``. Pure; called by the coordinator
        on every rank of every save and load, and by the property kit."""
        raise NotImplementedError(f"{type(self).__name__} must implement replica_sets(topology)")

    def params(self) -> dict[str, Any]:
        """Plain JSON identifying this instance; ``type(self)(**params)`` rebuilds it.
        Default: the dataclass fields if the pattern is a dataclass, else ``{}``."""
        if dataclasses.is_dataclass(self):
            return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}
        return {}

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        """File name (without directory and suffix) of replica set ``index`` (ordered by
        lowest rank) whose ranks are ``members``. Must be a safe name, distinct per set."""
        return f"{self.kind}-{index:03d}"

    def _file_stems(self, partition: Partition) -> list[Any]:
        """:meth:`file_stem` of every set, in order. Called by :func:`distckpt.layout.plan_component`;
        a built-in may answer without a Python call per set, but only for its own ``file_stem``."""
        return list(map(self.file_stem, range(len(partition)), partition))

    def describe(self) -> str:
        """Short text for logs, errors and the CLI: ``kind`` or ``kind(param=value, ...)``."""
        return describe_record(self.kind, self.params())

    # -------------------------------------------------------------- derived

    def partition(self, topology: Topology) -> Partition:
        """:meth:`replica_sets`, checked to partition the world and sorted by lowest rank.
        Raises :class:`~distckpt.errors.TopologyMismatchError` naming the kind and the
        offending ranks (an exception from the pattern's own code propagates)."""
        sets = self.replica_sets(topology)
        for known in (topology.nodes, *topology.groups.values()):
            if sets is known:  # the topology's own partition (PER_NODE, one-group PER_GROUP): checked already
                return known
        return check_partition(sets, topology.world_size, f"pattern {self.describe()}")

    def record(self) -> dict[str, Any]:
        """``{"kind": ..., "params": {...}}`` as written in the manifest."""
        return {"kind": self.kind, "params": self.params()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pattern):
            return NotImplemented
        return self.kind == other.kind and _canonical(self.params()) == _canonical(other.params())

    def __hash__(self) -> int:
        return hash((self.kind, _canonical(self.params())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _canonical(params: Mapping[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def describe_record(kind: str, params: Mapping[str, Any]) -> str:
    """``kind`` or ``kind(a=1, groups=dp+tp)``: how patterns are named in messages and tables."""
    if not params:
        return kind
    if set(params) == {"groups"} and isinstance(params["groups"], list):
        return f"{kind}({','.join(str(g) for g in params['groups'])})"
    return f"{kind}({', '.join(f'{k}={json.dumps(v)}' for k, v in sorted(params.items()))})"


def register_pattern(cls: P) -> P:
    """Register a :class:`Pattern` subclass under its ``kind``; usable as a class decorator.

    Called at import time of the module defining the pattern (every process that
    saves or loads it must import that module). Registering the same class again
    is a no-op; a malformed kind, a non-Pattern class, or a kind already taken by
    another class is a ``ValueError``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Pattern)):
        raise ValueError(f"register_pattern: expected a Pattern subclass, got {cls!r}")
    kind = getattr(cls, "kind", "")
    if not isinstance(kind, str) or KIND_PATTERN.fullmatch(kind) is None:
        raise ValueError(f"register_pattern: {cls.__name__}.kind must match [a-z][a-z0-9_]{{0,63}}, got {kind!r}")
    if cls.replica_sets is Pattern.replica_sets:
        raise ValueError(f"register_pattern: {cls.__name__} does not implement replica_sets(topology)")
    known = _REGISTRY.get(kind)
    if known is not None and known is not cls and not same_definition(known, cls):
        raise ValueError(
            f"register_pattern: kind {kind!r} is already registered by {known.__module__}.{known.__qualname__}"
        )
    _REGISTRY[kind] = cls
    return cls


def same_definition(a: type, b: type) -> bool:
    """Whether two classes are one definition imported twice under different module names
    (a test runner's rootdir import and a dotted import of the same file): same qualified
    name, same source file. Such a class may register the kind again."""
    def source(cls: type) -> str | None:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        return os.path.realpath(path) if path else None

    return a.__qualname__ == b.__qualname__ and source(a) is not None and source(a) == source(b)


def registered_patterns() -> dict[str, type[Pattern]]:
    """Every registered kind and its class (a copy)."""
    return dict(_REGISTRY)


def pattern_from_record(kind: str, params: Mapping[str, Any]) -> Pattern:
    """Rebuild a pattern from its manifest record. Raises ``LookupError`` naming the kind
    when no class is registered for it, ``ValueError`` when the params do not fit."""
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise LookupError(
            f"sharing pattern kind {kind!r} is not registered in this process; import the module "
            f"that registers it (@distckpt.register_pattern) before loading (registered: "
            f"{', '.join(sorted(_REGISTRY))})"
        )
    try:
        return cls(**dict(params))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sharing pattern {describe_record(kind, params)}: cannot rebuild {cls.__name__}: {exc}") from None


# ---------------------------------------------------------------- built-ins


@register_pattern
class Global(Pattern):
    """One set of every rank, but only rank 0's copy is authoritative (no validation)."""

    kind = "global"
    identical_replicas = False
    elastic = True
    legacy_kind = "shared"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [range(topology.world_size)]

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return "global"


@register_pattern
class Replicated(Pattern):
    """One set of every rank, identical on all."""

    kind = "replicated"
    elastic = True
    legacy_kind = "shared"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return [range(topology.world_size)]

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return "replicated"


@register_pattern
class PerRank(Pattern):
    """Every rank alone: nothing to compare, so ``identical_replicas`` is off."""

    kind = "per_rank"
    identical_replicas = False
    legacy_kind = "rank"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return list(zip(range(topology.world_size)))  # [(0,), (1,), ...], built by C code

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"rank-{members[0]:05d}"

    def _file_stems(self, partition: Partition) -> list[Any]:
        if type(self).file_stem is not PerRank.file_stem:  # a subclass names its files itself
            return super()._file_stems(partition)
        return list(map("rank-{:05d}".format, map(itemgetter(0), partition)))  # 65,536 names, no Python frame


@register_pattern
class PerNode(Pattern):
    """The ranks of each node."""

    kind = "per_node"
    legacy_kind = "node"

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        return topology.nodes

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"node-{index:03d}"


@register_pattern
@dataclasses.dataclass(frozen=True, init=False, eq=False, repr=False)
class PerGroup(Pattern):
    """The groups of a named partition; with several names, the join of those partitions
    (ranks sharing a group in any of them share a set): ``PerGroup("pp", "tp")`` on a
    dp x pp x tp mesh gives one set per dp coordinate."""

    kind = "per_group"
    legacy_kind = "group"
    groups: tuple[str, ...]

    def __init__(self, *names: str, groups: Sequence[str] | None = None) -> None:
        if groups is not None:
            if names:
                raise ValueError("PerGroup: give the group names positionally or as groups=, not both")
            if isinstance(groups, str):
                groups = [groups]
            names = tuple(groups)
        if not names:
            raise ValueError("PerGroup: name at least one process group")
        for name in names:
            check_name(name, field_name="process_group_name")
        if len(set(names)) != len(names):
            raise ValueError(f"PerGroup: group names repeat: {list(names)}")
        object.__setattr__(self, "groups", tuple(names))

    def replica_sets(self, topology: Topology) -> Sequence[Sequence[int]]:
        parts = [topology.group(name) for name in self.groups]
        return parts[0] if len(parts) == 1 else join_partitions(topology.world_size, parts)

    def params(self) -> dict[str, Any]:
        return {"groups": list(self.groups)}

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"{'_'.join(self.groups)}-{index:03d}"


class SharingPattern(str, Enum):
    """The original names of the five built-in patterns, kept as aliases.

    ``SharingPattern.PER_GROUP`` with ``process_group_name="dp"`` is
    ``PerGroup("dp")``; the others are ``Global()``, ``Replicated()``,
    ``PerRank()`` and ``PerNode()``.
    """

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"

    @property
    def can_validate(self) -> bool:
        """Whether replicas exist that validation could compare."""
        return _REGISTRY[self.value].identical_replicas and self.value != "per_rank"

    def pattern(self, group_name: str | None = None) -> Pattern:
        """The built-in pattern object this alias names (``group_name`` for PER_GROUP only)."""
        if self.value == "per_group":
            if group_name is None:
                raise ValueError("process_group_name: PER_GROUP must name the process group whose members share it")
            return PerGroup(group_name)
        if group_name is not None:
            raise ValueError(f"process_group_name: only PER_GROUP takes a process group name, not {self.name}")
        return _REGISTRY[self.value]()

    @classmethod
    def coerce(cls, value: SharingPattern | str, *, field_name: str = "sharing_pattern") -> SharingPattern:
        """Accept an enum member or its string value (any case); else ``ValueError``."""
        return coerce_enum(cls, value, field_name, "a sharing pattern")


def resolve_pattern(value: Pattern | SharingPattern | str, group_name: str | None = None,
                    *, field_name: str = "sharing_pattern") -> Pattern:
    """A pattern object from what a declaration or scenario names: a :class:`Pattern`
    instance, a :class:`SharingPattern` alias or a registered kind string (any case for
    the built-ins). ``group_name`` is ``process_group_name`` (PER_GROUP only; a list of
    names gives the join). Raises ``ValueError`` naming ``field_name``."""
    if isinstance(value, Pattern):
        if group_name is not None:
            raise ValueError(f"process_group_name: given with a pattern object {value.describe()}; "
                             "name the groups in the pattern instead")
        known = _REGISTRY.get(value.kind)
        if known is None or not (known is type(value) or same_definition(known, type(value))):
            raise ValueError(f"{field_name}: {type(value).__name__} (kind {value.kind!r}) is not registered; "
                             "decorate it with @distckpt.register_pattern")
        return value
    if isinstance(value, str):
        folded = value.lower() if value.lower() in BUILTIN_KINDS else value
        if folded == "per_group" and isinstance(group_name, (list, tuple)):
            return PerGroup(*group_name)
        if folded in BUILTIN_KINDS:
            return SharingPattern(folded).pattern(group_name)
        cls = _REGISTRY.get(value)
        if cls is not None:
            if group_name is not None:
                raise ValueError(f"process_group_name: pattern {value!r} takes no process group name")
            return cls()
    choices = ", ".join(sorted(_REGISTRY))
    raise ValueError(f"{field_name}: {value!r} is not a sharing pattern (registered: {choices})")


#: The kinds of the five built-ins (the values of :class:`SharingPattern`).
BUILTIN_KINDS = frozenset(m.value for m in SharingPattern)
