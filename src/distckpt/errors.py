"""The exception tree of distckpt.

Every error the library raises on purpose derives from :class:`CheckpointError`.
Each subclass also derives from the builtin it is closest to, so that callers who
only know ``ValueError`` or ``FileNotFoundError`` still catch it.

Errors raised during a collective save or load carry ``failures``: a mapping from
the global rank that failed to a one-line description. Every rank of the world
raises the same class with the same ``failures`` so that no rank is left waiting.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "ArgumentMismatchError",
    "CheckpointBusyError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CollectiveTimeoutError",
    "ComponentMismatchError",
    "CrossRankError",
    "IntegrityError",
    "ManifestError",
    "ReplicationMismatchError",
    "SerializationError",
    "TopologyMismatchError",
    "error_class_by_name",
]


class CheckpointError(Exception):
    """Root of every distckpt error.

    ``failures`` maps a global rank to the message of the error that rank hit;
    it is empty for errors raised locally before any collective began.
    ``phase`` names the protocol phase ("plan", "validate", "write", "commit",
    "resolve", "read") in which the error surfaced, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        failures: Mapping[int, str] | None = None,
        phase: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.failures: dict[int, str] = dict(sorted((failures or {}).items()))
        self.phase = phase

    def __str__(self) -> str:
        if not self.failures:
            return self.message
        lines = [self.message]
        for rank, msg in self.failures.items():
            lines.append(f"  rank {rank}: {msg}")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword-only state through pickling (rank processes send errors home).
        return (_rebuild, (type(self), self.message, self.failures, self.phase))


def _rebuild(
    cls: type[CheckpointError], message: str, failures: dict[int, str], phase: str | None
) -> CheckpointError:
    return cls(message, failures=failures, phase=phase)


class ManifestError(CheckpointError, ValueError):
    """A manifest is missing, unreadable, malformed or of an unknown format."""


class IntegrityError(CheckpointError, ValueError):
    """A checkpoint file is missing, has the wrong size or checksum, or is not listed."""


class ReplicationMismatchError(CheckpointError, ValueError):
    """Members of one replica set hold different state (validation failed)."""


class TopologyMismatchError(CheckpointError, ValueError):
    """The saved partition of ranks (world, nodes or groups) differs from the current one."""


class ComponentMismatchError(CheckpointError, ValueError):
    """Ranks declared different components, or a declaration disagrees with the checkpoint."""


class StateMismatchError(CheckpointError, ValueError):
    """A saved entry's shape, dtype, key set or layout differs from the live state dict.

    Raised on every rank before any byte is read into live tensors; the message names the
    component, the entry, and the saved and live values.
    """


class LayoutMismatchError(StateMismatchError, TopologyMismatchError):
    """A saved DTensor's mesh, placements or global shape differ from the live DTensor's.

    Resharding to another layout is not distckpt's job (use torch.distributed.checkpoint).
    """


class SerializationError(CheckpointError, TypeError):
    """A state dict holds an object outside the supported set; the message names its path."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The target checkpoint is already committed and overwriting was not requested."""


class CheckpointBusyError(CheckpointError, TimeoutError):
    """Another save held the checkpoints folder's lock, or the checkpoint's name, too long."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists where one was expected."""


class ArgumentMismatchError(CheckpointError, ValueError):
    """Ranks passed different arguments to the same collective call (``failures`` names the odd ranks)."""


class CrossRankError(CheckpointError, RuntimeError):
    """One or more ranks failed a collective phase; ``failures`` says which and why."""


class CollectiveTimeoutError(CrossRankError, TimeoutError):
    """A peer did not reach a collective in time (dead, hung, or never called)."""


_REGISTRY: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointError,
        ManifestError,
        IntegrityError,
        ReplicationMismatchError,
        TopologyMismatchError,
        ComponentMismatchError,
        StateMismatchError,
        LayoutMismatchError,
        SerializationError,
        CheckpointExistsError,
        CheckpointBusyError,
        CheckpointNotFoundError,
        ArgumentMismatchError,
        CrossRankError,
        CollectiveTimeoutError,
    )
}


def error_class_by_name(name: str) -> type[CheckpointError] | None:
    """Map a class name sent by a peer back to the class; ``None`` if not ours."""
    return _REGISTRY.get(name)
