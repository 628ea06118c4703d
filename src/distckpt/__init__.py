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
"""

from __future__ import annotations

from .components import StateComponent, Stateful, ValidationLevel
from .coordinator import CheckpointCoordinator
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
    StateMismatchError,
    TopologyMismatchError,
)
from .handle import SaveHandle
from .manifest import CheckpointManifest, ComponentManifest, FileEntry
from .patterns import Pattern, SharingPattern, register_pattern, registered_patterns
from .report import LoadReport
from .rng import RNGState
from .topology import Topology
from .version import __version__

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
    "StateComponent",
    "StateMismatchError",
    "Stateful",
    "Topology",
    "TopologyMismatchError",
    "ValidationLevel",
    "__version__",
    "register_pattern",
    "registered_patterns",
]
