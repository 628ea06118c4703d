"""Names: the one rule for component keys, group names and checkpoint ids.

Pure module (no I/O). A name is a safe path segment on every file system we
care about, so it can be joined to a directory without escaping it.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

__all__ = ["NAME_PATTERN", "check_name", "coerce_enum"]

E = TypeVar("E", bound=Enum)

#: Keys and group names: a safe path segment on every file system we care about.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(value: object, *, field_name: str) -> str:
    """Return ``value`` if it is a safe component key or group name.

    Called at declaration and when a manifest or scenario is read. Safe means:
    a string matching ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` that is not ``.`` or
    ``..``. Raises ``ValueError`` naming ``field_name`` otherwise.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field_name}: expected a string, got {type(value).__name__}")
    if value in (".", "..") or NAME_PATTERN.fullmatch(value) is None:
        raise ValueError(
            f"{field_name}: {value!r} is not a safe name; use 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit"
        )
    return value


def coerce_enum(cls: type[E], value: object, field_name: str, what: str) -> E:
    """``value`` as a member of the string enum ``cls``: a member, or its value in any case.
    Raises ``ValueError`` naming ``field_name`` and the choices otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value.lower())
        except ValueError:
            pass
    choices = ", ".join(str(member.value) for member in cls)
    raise ValueError(f"{field_name}: {value!r} is not {what} (choose one of {choices})")
