"""distckpt: distributed checkpointing by declared state-sharing pattern.

Declare each piece of training state once, with how it is shared across
ranks, and let one collective call save or load all of it::

    coordinator = CheckpointCoordinator(
        [StateComponent("model", model, SharingPattern.PER_GROUP,
                        process_group_name="dp", validate_replication=True)],
        process_groups={"dp": dp_group},
        output_dir="runs/exp1",
    )
    path = coordinator.save_checkpoint(checkpoint_id="1000")   # every rank
    coordinator.load_checkpoint()                               # every rank: latest
"""

from __future__ import annotations

__version__ = "0.1.0"

from .coordinator import CheckpointCoordinator
from .errors import (
    ArgumentMismatchError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    ComponentMismatchError,
    CrossRankError,
    IntegrityError,
    ManifestError,
    ReplicationMismatchError,
    SerializationError,
    TopologyMismatchError,
)
from .handle import SaveHandle
from .manifest import CheckpointManifest, ComponentManifest, FileEntry
from .patterns import SharingPattern, StateComponent, Stateful, ValidationLevel
from .report import LoadReport
from .rng import RNGState

__all__ = [
    "ArgumentMismatchError",
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
    "LoadReport",
    "ManifestError",
    "RNGState",
    "ReplicationMismatchError",
    "SaveHandle",
    "SerializationError",
    "SharingPattern",
    "StateComponent",
    "Stateful",
    "TopologyMismatchError",
    "ValidationLevel",
    "__version__",
]
