"""What one rank does in an example of :func:`~distckpt.testing.check_pattern`.

Shared by the threaded worlds (called in a thread with a ThreadComm) and the
gloo worlds (called in a rank process with torch.distributed initialised).
Inputs and results are plain JSON-able data, so they travel to processes
without pickling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..components import StateComponent
from ..coordinator import CheckpointCoordinator
from ..errors import CheckpointError
from ..patterns import Pattern
from .strategies import StateSpec, state_diff

__all__ = ["KEY", "InjectedFault", "rank_step", "variant_of"]

KEY = "state"
COORDINATOR_TIMEOUT = 20.0


class InjectedFault(RuntimeError):
    """Raised by the kit's phase hook on the victim rank."""


class _Box:
    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def variant_of(pattern: Pattern, sets: Sequence[Sequence[int]], rank: int) -> int:
    """Which state a rank holds: its set's index when replicas are identical, else its own
    rank (only the writer's copy, the lowest rank's, is authoritative)."""
    if not pattern.identical_replicas:
        return rank
    return next(i for i, s in enumerate(sets) if rank in s)


def rank_step(
    rank: int, pattern: Pattern, sets: Sequence[Sequence[int]], spec: StateSpec, out: str, op: Mapping[str, Any],
    dist: Any, process_groups: Mapping[str, Any],
) -> dict[str, Any]:
    """Run one operation (``op["kind"]`` is ``"save"`` or ``"load"``) on this rank; collective.

    Returns ``{"path": ...}`` (and ``"diff"`` for a load: ``None`` when the loaded
    state is bit-identical to the lowest rank of this rank's set), or
    ``{"error": class name, "failures": {rank: message}, "phase": ...}``.
    """
    validate = bool(op.get("validate"))
    fault = op.get("fault")

    def hook(phase: str, who: int) -> None:
        if fault is not None and phase == fault[0] and who == fault[1]:
            raise InjectedFault(f"injected in {phase} on rank {who}")

    own = next(s for s in sets if rank in s)
    if op["kind"] == "save":
        state = spec.build(variant_of(pattern, sets, rank))
        if op.get("perturb") == rank:
            state["anchor"][1] = 0.25  # one element differs from the rest of its set
        box = _Box(state)
    else:
        box = _Box(None)
    component = StateComponent(KEY, box, pattern, validate_replication=validate)
    try:
        coordinator = CheckpointCoordinator([component], process_groups=process_groups, dist=dist, output_dir=out,
                                            timeout=COORDINATOR_TIMEOUT, phase_hook=hook,
                                            min_part_bytes=op.get("min_part_bytes"))
        if op["kind"] == "save":
            return {"path": coordinator.save_checkpoint()}
        report = coordinator.load_checkpoint()
        expected = spec.build(variant_of(pattern, sets, min(own)))
        return {"path": report.path, "diff": state_diff(box.state, expected)}
    except CheckpointError as exc:
        return {"error": type(exc).__name__, "failures": {str(k): v for k, v in exc.failures.items()},
                "phase": exc.phase, "message": str(exc)}
