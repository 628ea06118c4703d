"""Every torch-version-dependent code path of the warm world pool, in one place.

Each shim names the torch releases it serves and why; tests/harness/test_compat.py
tests each of them on whichever torch runs the suite. Who calls this module: the
rank processes of :mod:`distckpt.testing.pool` (through :mod:`distckpt.testing._pool_rank`). Nothing here
is collective.

Releases: the floor declared in pyproject.toml is the oldest release the whole
suite passed on (docs/decisions.md, "Torch versions"); ``GLOO_TEARDOWN_DEADLOCKS``
below covers every release older than the first one seen to tear down cleanly.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "GLOO_TEARDOWN_DEADLOCKS",
    "TORCH_VERSION",
    "WORLDS_PER_PROCESS",
    "destroy_process_groups",
    "parse_version",
    "worlds_kept",
]


def parse_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string such as ``2.6.0+cu124`` or ``2.14.0a0``.

    Raises ``ValueError`` on a string that does not start with ``<int>.<int>``.
    """
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"not a torch version: {text!r}")
    return int(match.group(1)), int(match.group(2))


TORCH_VERSION: tuple[int, int] = parse_version(torch.__version__)

#: torch < 2.13 (measured on 2.6.0): ``destroy_process_group()`` can deadlock inside
#: the C++ destructor of a gloo process group when the peers close their
#: connections at the same moment (12 of 20 eight-rank worlds hung at teardown on
#: 2.6.0; 0 of hundreds on 2.13.0 and 2.14.1). 2.7-2.12 were not measured, so the
#: workaround covers every release before the first one seen to be clean; with
#: it the whole suite passed on 2.4.1, 2.5.1 and 2.6.0.
GLOO_TEARDOWN_DEADLOCKS: bool = TORCH_VERSION < (2, 13)

#: Where ``GLOO_TEARDOWN_DEADLOCKS``: how many worlds' process groups a rank process
#: keeps alive before it retires (their sockets and threads are only released when
#: the process exits; 8 worlds of a few groups each stay far below any fd limit).
WORLDS_PER_PROCESS = 8

# Process groups kept alive on purpose so that their destructors never run.
_kept: list[list[Any]] = []


def destroy_process_groups() -> None:
    """Deinitialise ``torch.distributed`` after a world (rank teardown; not collective).

    On releases where destroying a gloo group can deadlock, every live group is
    first kept referenced here, so ``destroy_process_group`` only unregisters them
    and no destructor runs; the rank process then retires after
    :data:`WORLDS_PER_PROCESS` worlds (see :func:`worlds_kept`) and ``os._exit``
    frees them without running destructors. Raises what ``destroy_process_group``
    raises; a no-op when nothing is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if GLOO_TEARDOWN_DEADLOCKS:
        _kept.append(_live_groups())
    dist.destroy_process_group()


def worlds_kept() -> int:
    """How many worlds' process groups this process holds (always 0 where teardown is safe)."""
    return len(_kept)


def _live_groups() -> list[Any]:
    """Every registered process group, the default one included (private c10d state)."""
    from torch.distributed import distributed_c10d

    world = getattr(distributed_c10d, "_world", None)
    groups = list(getattr(world, "pg_map", {}) or {})
    default = dist.group.WORLD
    if default is not None and default not in groups:
        groups.append(default)
    return groups
