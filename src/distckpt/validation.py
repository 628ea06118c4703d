"""Replica validation: phase 2 of a save, comparing every replica set member against member.

Called by the coordinator's facade (:meth:`CheckpointCoordinator.save_checkpoint`)
on every rank, between the plan and the write phase, only when some component
is validated. Collective: one all-gather of one digest per component; a second
one, only when some set disagrees, of the suspect components' per-entry
digests; for ``ValidationLevel.FULL`` a third of the differing tensors
themselves (bounded), to say how far apart they are. The verdict is identical
on every rank: :class:`~distckpt.errors.ReplicationMismatchError` naming the
odd ranks and entries, before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .collectives import Comm, exchange
from .components import StateComponent, ValidationLevel
from .digests import Mismatch, compare_replicas, describe_difference, digest_state, iter_leaves
from .dtensor import local_or_self
from .errors import ReplicationMismatchError
from .hashing import checksum_of
from .planning import SavePlan

__all__ = ["validate"]

#: At most this many bytes of differing tensors travel in the FULL level's extra all-gather.
_DETAIL_LIMIT_BYTES = 64 * 1024 * 1024


def validate(comm: Comm, plan: SavePlan, targets: Sequence[StateComponent], state_of: Callable[[str], Any],
             hook: Callable[[str], None]) -> None:
    """Collective: compare digests of every replica set of ``targets``; every rank reaches the same verdict.

    ``state_of(key)`` gives this rank's state of a component (asked once per
    save); ``hook`` is the phase hook, called with ``"validate"``. Returns
    when every set agrees; raises :class:`ReplicationMismatchError` (phase
    "validate") on every rank otherwise, or the carried error of any rank
    whose digesting failed.
    """
    if not targets:
        return

    mine: dict[str, dict[str, str]] = {}

    def work() -> dict[str, str]:
        hook("validate")
        for c in targets:
            mine[c.key] = digest_state(state_of(c.key), c.validation_level)
        return {key: _combined(entries) for key, entries in mine.items()}

    # Round 1: one digest per component. Round 2, only when some set
    # disagrees: the per-entry digests of the suspect components.
    combined = exchange(comm, "validate", work)
    suspects = [
        c.key for c in targets
        if any(len({combined[r][c.key] for r in members}) > 1
               for members in plan.components[c.key].replica_sets)
    ]
    if not suspects:
        return
    digests = exchange(comm, "validate", lambda: {key: mine[key] for key in suspects})
    mismatches: list[Mismatch] = []
    for key in suspects:
        sets = plan.components[key].replica_sets
        mismatches += compare_replicas(key, sets, {r: d[key] for r, d in enumerate(digests)})
    full = {c.key for c in targets if c.validation_level is ValidationLevel.FULL}
    if any(m.component in full for m in mismatches):
        mismatches = _measure_differences(comm, mismatches, full, state_of)
    failures: dict[int, str] = {}
    for m in mismatches:
        for group in m.groups[1:]:
            for rank in group:
                failures[rank] = (f"component {m.component!r} differs from ranks {list(m.groups[0])} in "
                                  + ", ".join(m.entries[:4]) + (" ..." if len(m.entries) > 4 else ""))
    raise ReplicationMismatchError(
        "replication validation failed; nothing was written:\n  " + "\n  ".join(m.describe() for m in mismatches),
        failures=failures, phase="validate",
    )


def _measure_differences(comm: Comm, mismatches: list[Mismatch], full: set[str],
                         state_of: Callable[[str], Any]) -> list[Mismatch]:
    """FULL level: one more all-gather of the differing tensors, then measure how far apart they are."""
    def work() -> dict[str, dict[str, Any]]:
        mine: dict[str, dict[str, Any]] = {}
        budget = _DETAIL_LIMIT_BYTES
        for m in mismatches:
            if m.component not in full or comm.rank not in {g[0] for g in m.groups}:
                continue
            leaves = {p: leaf for p, kind, leaf in iter_leaves(state_of(m.component)) if kind == "tensor"}
            for entry in m.entries:
                t = leaves.get(entry)
                t = None if t is None else local_or_self(t)  # a DTensor: compare the shards
                if t is not None and t.numel() * t.element_size() <= budget:
                    budget -= t.numel() * t.element_size()
                    mine.setdefault(m.component, {})[entry] = t.detach().cpu()
        return mine

    shared = exchange(comm, "validate", work)
    out = []
    for m in mismatches:
        details: dict[str, str] = {}
        if m.component in full:
            ref = m.groups[0][0]
            for group in m.groups[1:]:
                for entry in m.entries:
                    a = shared[ref].get(m.component, {}).get(entry)
                    b = shared[group[0]].get(m.component, {}).get(entry)
                    if a is not None and b is not None:
                        details[f"{entry} (rank {ref} vs {group[0]})"] = describe_difference(a, b)
        out.append(Mismatch(m.component, m.replica_set, m.groups, m.entries, details))
    return out


def _combined(entries: Mapping[str, str]) -> str:
    """One digest for a whole component: of its entries' digests in path order."""
    return checksum_of(json.dumps(sorted(entries.items())).encode("ascii"), "xxh3-64")
