"""One component's declaration as plain data: the harness's and the tests' one dataclass.

Who uses it: the harness's scenario files (``harness.scenario`` parses each
``[components]`` entry into a :class:`Declaration`), the property and fault
tests (drawn declarations shipped to rank processes), and anyone who wants to
describe a :class:`~distckpt.StateComponent` before the stateful exists.
Nothing here is collective or does I/O; construction raises ``ValueError``
naming the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..components import StateComponent, Stateful
from ..patterns import Pattern, pattern_from_record, registered_patterns

__all__ = ["LEVELS", "Declaration"]

#: Replication validation levels, by the values of :class:`~distckpt.ValidationLevel`.
LEVELS: tuple[str, ...] = ("none", "quick", "tensor", "full")


@dataclass(frozen=True)
class Declaration:
    """How component ``key`` is declared: pattern, validation and whether a load needs it.

    ``pattern`` is a registered pattern kind (lower case) and ``params`` its
    parameters as the manifest records them (``{"kind": pattern, "params":
    params}``). ``group`` is the built-in ``per_group``'s group name, or a tuple
    of names for the join of several groups; for ``per_group`` the params are
    derived from it (``{"groups": [...]}``) when not given. Equal declarations
    compare equal and pickle, so they travel to rank processes as they are.
    """

    key: str
    pattern: str
    group: str | tuple[str, ...] | None = None
    validate: bool = False
    level: str = "tensor"
    required: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):  # its safety is StateComponent's to check, as for any key
            raise ValueError(f"Declaration.key: expected a string, got {self.key!r}")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"Declaration.pattern: expected a pattern kind, got {self.pattern!r}")
        for name in ("validate", "required"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Declaration.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.level not in LEVELS:
            raise ValueError(f"Declaration.level: expected one of {', '.join(LEVELS)}, got {self.level!r}")
        if isinstance(self.group, list):
            object.__setattr__(self, "group", tuple(self.group))
        if not isinstance(self.params, Mapping):
            raise ValueError(f"Declaration.params: expected a mapping, got {self.params!r}")
        if self.pattern == "per_group" and self.group is not None and not self.params:
            names = [self.group] if isinstance(self.group, str) else list(self.group)
            object.__setattr__(self, "params", {"groups": names})

    def record(self) -> dict[str, Any]:
        """``{"kind": ..., "params": {...}}``: the pattern as the manifest records it."""
        return {"kind": self.pattern, "params": dict(self.params)}

    def pattern_object(self) -> Pattern:
        """The :class:`~distckpt.patterns.Pattern` this declares (its kind must be registered here).

        Raises ``LookupError`` for an unregistered kind and ``ValueError`` for params its class refuses.
        """
        return pattern_from_record(self.pattern, dict(self.params))

    @property
    def can_validate(self) -> bool:
        """Whether the pattern has identical replicas to compare (``LookupError`` if unregistered)."""
        return bool(registered_patterns()[self.pattern].identical_replicas)

    def validated(self, save_validate: bool) -> bool:
        """Whether a save (with ``validate=save_validate``) compares this component's replicas."""
        return self.can_validate and self.level != "none" and (self.validate or save_validate)

    def component(self, stateful: Stateful) -> StateComponent:
        """The :class:`~distckpt.StateComponent` this declares for ``stateful``."""
        return StateComponent(
            key=self.key,
            stateful=stateful,
            sharing_pattern=self.pattern_object(),
            required=self.required,
            validate_replication=self.validate,
            validation_level=self.level,  # type: ignore[arg-type]  # coerced by StateComponent
        )
