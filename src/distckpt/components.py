"""Declarations: state components, the Stateful contract and validation levels.

Pure module: no I/O, no collectives. Trainers build :class:`StateComponent`
objects once; everything here is validated at construction so that a bad
declaration fails at the line that wrote it, before any rank touches the disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

from .names import check_name, coerce_enum
from .patterns import Pattern, SharingPattern, resolve_pattern

__all__ = ["StateComponent", "Stateful", "ValidationLevel"]


class ValidationLevel(str, Enum):
    """How thoroughly replicas are compared before a save.

    - ``NONE``: no comparison.
    - ``QUICK``: structure, shapes, dtypes, every byte of tensors up to 1 MiB
      and a deterministic sample of values spread over each larger tensor.
    - ``TENSOR``: an exact digest of every tensor and every non-tensor leaf, at
      any depth.
    - ``FULL``: as ``TENSOR``, and for differing tensors how far apart they are.
    """

    NONE = "none"
    QUICK = "quick"
    TENSOR = "tensor"
    FULL = "full"

    @classmethod
    def coerce(cls, value: ValidationLevel | str, *, field_name: str = "validation_level") -> ValidationLevel:
        """Accept an enum member or its string value (any case); else ``ValueError``."""
        return coerce_enum(cls, value, field_name, "a validation level")


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass(frozen=True, eq=False)
class StateComponent:
    """One piece of training state and how it is shared across ranks.

    Built by the trainer, read by :class:`~distckpt.CheckpointCoordinator`.
    ``sharing_pattern`` is a :class:`~distckpt.patterns.Pattern` object
    (``PerGroup("pp", "tp")``, a registered pattern of your own), a
    :class:`SharingPattern` alias, or a registered kind string
    (``"per_group"``, ``"per_local_rank"``). The resolved object is
    :attr:`pattern`. For the built-ins ``sharing_pattern`` reads back as the
    :class:`SharingPattern` alias and ``process_group_name`` as the group, as in
    the original API.

    Construction raises ``ValueError`` naming the offending field when:

    - ``key`` is not a safe name (see :func:`~distckpt.names.check_name`);
    - ``stateful`` lacks ``state_dict``/``load_state_dict``;
    - the pattern is unknown, or ``process_group_name`` is missing for
      ``PER_GROUP`` or given for another pattern;
    - ``validate_replication`` is set on a pattern without identical replicas
      (``GLOBAL``, ``PER_RANK``: nothing to compare);
    - ``validation_level`` is not a level;
    - ``metadata`` is not a JSON object (it is recorded in the manifest).
    """

    key: str
    stateful: Stateful
    sharing_pattern: SharingPattern | Pattern | str
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: ValidationLevel = ValidationLevel.TENSOR
    metadata: Mapping[str, Any] | None = None
    pattern: Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_name(self.key, field_name="key")
        if not (callable(getattr(self.stateful, "state_dict", None))
                and callable(getattr(self.stateful, "load_state_dict", None))):
            raise ValueError(
                f"stateful: component {self.key!r} needs an object with state_dict() and "
                f"load_state_dict(); got {type(self.stateful).__name__}"
            )
        try:
            pattern = resolve_pattern(self.sharing_pattern, self.process_group_name)
        except ValueError as exc:
            raise ValueError(f"{exc} (component {self.key!r})") from None
        object.__setattr__(self, "pattern", pattern)
        alias = _alias(pattern)
        if alias is not None:
            object.__setattr__(self, "sharing_pattern", alias[0])
            object.__setattr__(self, "process_group_name", alias[1])
        else:
            object.__setattr__(self, "sharing_pattern", pattern)
        if not isinstance(self.required, bool):
            raise ValueError(f"required: expected a bool, got {self.required!r}")
        if not isinstance(self.validate_replication, bool):
            raise ValueError(f"validate_replication: expected a bool, got {self.validate_replication!r}")
        object.__setattr__(self, "validation_level", ValidationLevel.coerce(self.validation_level))
        if self.validate_replication and not pattern.identical_replicas:
            raise ValueError(
                f"validate_replication: component {self.key!r} is {pattern.describe()}, which has no "
                "identical replicas to compare; validation applies to patterns with identical "
                "replicas (REPLICATED, PER_NODE, PER_GROUP, ...)"
            )
        meta = {} if self.metadata is None else self.metadata
        if not isinstance(meta, Mapping):
            raise ValueError(f"metadata: expected a mapping, got {type(meta).__name__}")
        try:
            json.dumps(dict(meta), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata: component {self.key!r} metadata must be plain JSON ({exc})") from None
        object.__setattr__(self, "metadata", MappingProxyType(dict(meta)))

    def describe(self) -> tuple[str, str, str | None]:
        """(key, pattern text, group name): what ranks must agree on."""
        return (self.key, self.pattern.describe(), self.process_group_name)


def _alias(pattern: Pattern) -> tuple[SharingPattern, str | None] | None:
    """The original enum name (and group) of a built-in pattern, or ``None``."""
    try:
        member = SharingPattern(pattern.kind)
    except ValueError:
        return None
    groups = pattern.params().get("groups")
    if groups is None:
        return member, None
    return (member, groups[0]) if len(groups) == 1 else None
