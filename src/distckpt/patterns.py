"""Declarations: sharing patterns, validation levels and state components.

Pure module: no I/O, no collectives. Trainers build :class:`StateComponent`
objects once; everything here is validated at construction so that a bad
declaration fails at the line that wrote it, before any rank touches the disk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = [
    "NAME_PATTERN",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "ValidationLevel",
    "check_name",
]

#: Keys and group names: a safe path segment on every file system we care about.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


_E = TypeVar("_E", bound=Enum)


def _coerce(cls: type[_E], value: object, field_name: str, what: str) -> _E:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    choices = ", ".join(str(member.value) for member in cls)
    raise ValueError(f"{field_name}: {value!r} is not {what} (choose one of {choices})")


class SharingPattern(str, Enum):
    """How a component's state is spread over the ranks of the world.

    A pattern is a partition of the world's ranks into replica sets: ranks of
    one set hold the same state, different sets hold different state. One file
    is written per replica set, by the lowest rank of that set.
    """

    GLOBAL = "global"
    PER_RANK = "per_rank"
    REPLICATED = "replicated"
    PER_GROUP = "per_group"
    PER_NODE = "per_node"

    @property
    def can_validate(self) -> bool:
        """Whether replicas exist that validation could compare."""
        return self in (SharingPattern.REPLICATED, SharingPattern.PER_GROUP, SharingPattern.PER_NODE)

    @classmethod
    def coerce(cls, value: SharingPattern | str, *, field_name: str = "sharing_pattern") -> SharingPattern:
        """Accept an enum member or its string value (any case); else ``ValueError``."""
        return _coerce(cls, value, field_name, "a sharing pattern")


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
        return _coerce(cls, value, field_name, "a validation level")


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


def check_name(value: object, *, field_name: str) -> str:
    """Return ``value`` if it is a safe component key or group name.

    Safe means: a string matching ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` that is
    not ``.`` or ``..``. Raises ``ValueError`` naming ``field_name`` otherwise.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field_name}: expected a string, got {type(value).__name__}")
    if value in (".", "..") or NAME_PATTERN.fullmatch(value) is None:
        raise ValueError(
            f"{field_name}: {value!r} is not a safe name; use 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, eq=False)
class StateComponent:
    """One piece of training state and how it is shared across ranks.

    Built by the trainer, read by :class:`~distckpt.CheckpointCoordinator`.
    Construction raises ``ValueError`` naming the offending field when:

    - ``key`` is not a safe name (see :func:`check_name`);
    - ``stateful`` lacks ``state_dict``/``load_state_dict``;
    - ``process_group_name`` is missing for ``PER_GROUP`` or given for another pattern;
    - ``validate_replication`` is set on ``GLOBAL`` or ``PER_RANK`` (nothing to compare);
    - ``validation_level`` is not a level;
    - ``metadata`` is not a JSON object (it is recorded in the manifest).
    """

    key: str
    stateful: Stateful
    sharing_pattern: SharingPattern
    process_group_name: str | None = None
    required: bool = True
    validate_replication: bool = False
    validation_level: ValidationLevel = ValidationLevel.TENSOR
    metadata: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check_name(self.key, field_name="key")
        if not (callable(getattr(self.stateful, "state_dict", None))
                and callable(getattr(self.stateful, "load_state_dict", None))):
            raise ValueError(
                f"stateful: component {self.key!r} needs an object with state_dict() and "
                f"load_state_dict(); got {type(self.stateful).__name__}"
            )
        pattern = SharingPattern.coerce(self.sharing_pattern)
        object.__setattr__(self, "sharing_pattern", pattern)
        if pattern is SharingPattern.PER_GROUP:
            if self.process_group_name is None:
                raise ValueError(
                    f"process_group_name: component {self.key!r} is PER_GROUP and must name "
                    "the process group whose members share it"
                )
            check_name(self.process_group_name, field_name="process_group_name")
        elif self.process_group_name is not None:
            raise ValueError(
                f"process_group_name: component {self.key!r} is {pattern.name}; only "
                "PER_GROUP components take a process group name"
            )
        if not isinstance(self.required, bool):
            raise ValueError(f"required: expected a bool, got {self.required!r}")
        if not isinstance(self.validate_replication, bool):
            raise ValueError(f"validate_replication: expected a bool, got {self.validate_replication!r}")
        level = ValidationLevel.coerce(self.validation_level)
        object.__setattr__(self, "validation_level", level)
        if self.validate_replication and not pattern.can_validate:
            raise ValueError(
                f"validate_replication: component {self.key!r} is {pattern.name}, which has no "
                "replicas to compare; validation applies to REPLICATED, PER_GROUP and PER_NODE"
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
        """(key, pattern value, group name): what ranks must agree on."""
        return (self.key, self.sharing_pattern.value, self.process_group_name)
