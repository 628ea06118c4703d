"""The coordinator's arguments, checked: its constructor's components, settings and process
groups, and each call's arguments in the form every rank compares.

Called by :class:`~distckpt.coordinator.CheckpointCoordinator` only: at
construction (a clear ``TypeError`` or ``ValueError`` naming the argument,
before anything collective happens) and at the start of every save (the
arguments that travel in the plan phase's first collective, where any
difference between ranks raises
:class:`~distckpt.errors.ArgumentMismatchError`). Local; no I/O.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Mapping
from typing import Any

from .components import StateComponent
from .loading import LOAD_STRATEGIES
from .names import check_name

__all__ = ["call_args", "checked_components", "checked_settings", "normalise_groups"]


def checked_components(state_components: Iterable[StateComponent]) -> list[StateComponent]:
    """Construction: every item a StateComponent, keys unique ignoring case (they become directory names)."""
    components = list(state_components)
    seen: dict[str, str] = {}
    for c in components:
        if not isinstance(c, StateComponent):
            raise TypeError(f"state_components: expected StateComponent, got {type(c).__name__}")
        folded = c.key.casefold()
        if folded in seen:
            raise ValueError(
                f"state_components: keys {seen[folded]!r} and {c.key!r} collide "
                "(keys must be unique ignoring case)"
            )
        seen[folded] = c.key
    return components


def checked_settings(keep_last: Any, min_part_bytes: Any, load_strategy: Any, timeout: Any) -> float:
    """Construction: the coordinator's settings are usable; returns the timeout in seconds."""
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last: expected a positive int or None, got {keep_last!r}")
    if min_part_bytes is not None and (type(min_part_bytes) is not int or min_part_bytes < 1):
        raise ValueError(f"min_part_bytes: expected a positive int or None, got {min_part_bytes!r}")
    if load_strategy not in LOAD_STRATEGIES:
        raise ValueError(f"load_strategy: expected one of {list(LOAD_STRATEGIES)}, got {load_strategy!r}")
    seconds = timeout.total_seconds() if isinstance(timeout, _dt.timedelta) else float(timeout)
    if seconds <= 0:
        raise ValueError(f"timeout: expected a positive duration, got {timeout!r}")
    return seconds


def call_args(**args: Any) -> dict[str, Any]:
    """Per-call arguments as every rank compares them: paths absolute, ids as text, flags as bools."""
    out: dict[str, Any] = {}
    for name, value in args.items():
        try:
            if value is None:
                out[name] = None
            elif name == "checkpoint_path":
                out[name] = os.path.abspath(os.fspath(value))
            elif name == "checkpoint_id":
                out[name] = str(value)
            else:
                out[name] = bool(value)
        except Exception:  # unusable: the call itself reports it; compare by type only
            out[name] = f"<{type(value).__name__}>"
    return out


def normalise_groups(process_groups: Any) -> dict[str, Any]:
    if process_groups is None:
        return {}
    if isinstance(process_groups, Mapping):
        groups = dict(process_groups)
    elif hasattr(process_groups, "mesh_dim_names"):
        names = process_groups.mesh_dim_names
        if not names:
            raise ValueError("process_groups: a DeviceMesh needs mesh_dim_names to name its groups")
        groups = {name: process_groups.get_group(name) for name in names}
    else:
        raise TypeError(
            f"process_groups: expected a dict of name -> ProcessGroup or a DeviceMesh, got {type(process_groups).__name__}"
        )
    folded: dict[str, str] = {}
    for name in groups:
        check_name(name, field_name="process_groups")
        if name.casefold() in folded:
            raise ValueError(
                f"process_groups: names {folded[name.casefold()]!r} and {name!r} collide "
                "(group names must be unique ignoring case)"
            )
        folded[name.casefold()] = name
    return groups
