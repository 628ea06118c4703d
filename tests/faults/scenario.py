"""The fixed world most faults are injected into: every pattern on a dp x tp mesh.

Built on the property suite's :class:`~tests.property.strategies.Example`, so
states are materialised per rank (identical within a replica set, different
across sets and across generations) and the expected files and loads come from
the independent oracle.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from tests.property import exact
from tests.property.strategies import Decl, Example, Topo

#: Component key -> declaration, one per pattern, two validated.
DECLS = (
    Decl("model", "per_group", group="dp", validate=True, level="tensor"),
    Decl("dataset", "per_group", group="tp"),
    Decl("optimizer", "per_node"),
    Decl("scheduler", "replicated", validate=True, level="full"),
    Decl("trainer", "global"),
    Decl("rng", "per_rank"),
)


def _base(key: str, big: bool) -> dict[Any, Any]:
    return {
        "weight": torch.arange(256 * 1024 if big else 16, dtype=torch.float32).reshape(-1, 4),
        "state": {0: {"exp_avg": torch.linspace(-1, 1, 6, dtype=torch.bfloat16), "step": 3}},
        "meta": OrderedDict(name=key, ratio=float("inf"), seen=[1, 2, (3, b"\x00")]),
        "np": np.arange(5, dtype=np.int16),
    }


def example(nodes: int = 2, procs: int = 2, mesh: tuple[tuple[str, int], ...] | None = None,
            decls: tuple[Decl, ...] = DECLS, big: bool = False) -> Example:
    """The fault world: ``nodes x procs`` ranks (torchrun numbering), mesh dp x tp by default.

    ``big``: the PER_RANK component ("rng") weighs 1 MiB per rank, every other file stays small.
    """
    world = nodes * procs
    if mesh is None:
        mesh = (("dp", 2), ("tp", world // 2)) if world % 2 == 0 else (("dp", 1), ("tp", world))
    topo = Topo(nodes, procs, tuple(r // procs for r in range(world)), mesh)
    return Example(topo, decls, {d.key: _base(d.key, big and d.pattern == "per_rank") for d in decls})


def check_loaded(ex: Example, rank: int, states: dict[str, Any], generation: int = 0) -> None:
    """Assert ``states`` (what ``rank`` loaded) is bit-exactly what generation ``generation`` saved."""
    for d in ex.decls:
        problem = exact.diff(ex.expected_after_load(d.key, rank, generation), states[d.key])
        assert problem is None, f"rank {rank}, {d.key!r}: {problem}"


def hidden_entries(out: str) -> list[str]:
    """Staging and trash leftovers in ``<out>/checkpoints``."""
    d = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith(".")) if os.path.isdir(d) else []


def committed(out: str) -> list[str]:
    d = os.path.join(out, "checkpoints")
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if os.path.isdir(d) else []
