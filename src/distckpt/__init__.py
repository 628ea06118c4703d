"""distckpt: distributed checkpointing by declared state-sharing pattern.

Declare each piece of training state once, with how it is shared across
ranks, and let one collective call save or load all of it::

    coordinator = CheckpointCoordinator(
        [StateComponent("model", model, PerGroup("dp"), validate_replication=True)],
        process_groups={"dp": dp_group},
        output_dir="runs/exp1",
    )
    path = coordinator.save_checkpoint(checkpoint_id="1000")   # every rank
    coordinator.load_checkpoint()                               # every rank: latest

A sharing pattern is a partition of the ranks into replica sets
(:mod:`distckpt.patterns`); ``SharingPattern`` keeps the original names of
the built-ins, and ``register_pattern`` adds your own.

``verify_checkpoint`` and ``diff_checkpoints`` check a checkpoint on disk and
compare two (what ``distckpt verify`` and ``distckpt diff`` print).

The names that need torch (``CheckpointCoordinator``, ``RNGState``,
``diff_checkpoints``, ``DiffReport``) are imported on first use, so that
``import distckpt`` (and the ``distckpt`` command line's ``ls``, ``inspect``
and ``verify``) does not load torch.
"""

from __future__ import annotations

import typing as _typing

from .components import StateComponent, Stateful, ValidationLevel
from .errors import (
    ArgumentMismatchError,
    CheckpointBusyError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    ComponentMismatchError,
    CrossRankError,
    IntegrityError,
    LayoutMismatchError,
    ManifestError,
    ReplicationMismatchError,
    SerializationError,
    StateChangedError,
    StateMismatchError,
    TopologyMismatchError,
)
from .handle import SaveHandle
from .manifest import CheckpointManifest, ComponentManifest, FileEntry
from .patterns import Pattern, SharingPattern, register_pattern, registered_patterns
from .report import LoadReport
from .topology import Topology
from .verification import VerificationProblem, VerificationReport, verify_checkpoint
from .version import __version__

if _typing.TYPE_CHECKING:
    from .comparison import DiffReport, diff_checkpoints
    from .coordinator import CheckpointCoordinator
    from .rng import RNGState

__all__ = [
    "ArgumentMismatchError",
    "CheckpointBusyError",
    "CheckpointCoordinator",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointManifest",
    "CheckpointNotFoundError",
    "CollectiveTimeoutError",
    "ComponentManifest",
    "ComponentMismatchError",
    "CrossRankError",
    "DiffReport",
    "FileEntry",
    "IntegrityError",
    "LayoutMismatchError",
    "LoadReport",
    "ManifestError",
    "Pattern",
    "RNGState",
    "ReplicationMismatchError",
    "SaveHandle",
    "SerializationError",
    "SharingPattern",
    "StateChangedError",
    "StateComponent",
    "StateMismatchError",
    "Stateful",
    "Topology",
    "TopologyMismatchError",
    "ValidationLevel",
    "VerificationProblem",
    "VerificationReport",
    "__version__",
    "diff_checkpoints",
    "register_pattern",
    "registered_patterns",
    "verify_checkpoint",
]

# Public names whose modules import torch: loaded on first access (PEP 562).
_LAZY = {
    "CheckpointCoordinator": "coordinator",
    "DiffReport": "comparison",
    "RNGState": "rng",
    "diff_checkpoints": "comparison",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
