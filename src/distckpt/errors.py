"""The exception tree of distckpt.

Every error the library raises on purpose derives from :class:`CheckpointError`.
Each subclass also derives from the builtin it is closest to, so that callers who
only know ``ValueError`` or ``FileNotFoundError`` still catch it.

Errors raised during a collective save or load carry ``failures``: a mapping from
the global rank that failed to a one-line description. Every rank of the world
raises the same class with the same ``failures`` so that no rank is left waiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    "StateChangedError",
    "TopologyMismatchError",
    "error_class_by_name",
    "group_ranks",
    "on_every_rank",
    "rank_span",
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
        groups = group_ranks(self.failures)
        if len(groups) == 1 and groups[0][1] in self.message:  # the message already says it
            span = rank_span(groups[0][0])
            return self.message if span in self.message else f"{self.message}\n  ({span})"
        lines = [self.message]
        for ranks, msg in groups:
            lines.append(f"  {rank_span(ranks)}: " + msg.replace("\n", "\n    "))
        return "\n".join(lines)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword-only state through pickling (rank processes send errors home).
        return (_rebuild, (type(self), self.message, self.failures, self.phase))


def rank_span(ranks: Iterable[int]) -> str:
    """``"rank 3"``, ``"ranks 0-3"`` or ``"ranks 0-2, 5, 7-9"``: ranks as runs. Pure."""
    ordered = sorted(set(ranks))
    runs: list[list[int]] = []
    for rank in ordered:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"rank {text}" if len(ordered) == 1 else f"ranks {text}"


def group_ranks(by_rank: Mapping[int, str]) -> list[tuple[tuple[int, ...], str]]:
    """Ranks grouped by identical message, in the order of each message's lowest rank. Pure.

    Used wherever a cross-rank error is written out, so that one message shared by
    many ranks appears once ("ranks 0-3: ...") instead of once per rank.
    """
    grouped: dict[str, list[int]] = {}
    for rank in sorted(by_rank):
        grouped.setdefault(by_rank[rank], []).append(rank)
    return [(tuple(ranks), msg) for msg, ranks in grouped.items()]


def on_every_rank(exc: CheckpointError, phase: str, world_size: int) -> CheckpointError:
    """``exc`` as raised by a collective step: ``phase`` set, and ``failures`` naming every
    rank when it named none (a check every rank ran on the same gathered data). Pure.

    Called by the coordinator around the deterministic checks it runs after an all-gather;
    an error that already carries both is returned unchanged.
    """
    if exc.failures and exc.phase is not None:
        return exc
    failures = exc.failures or {rank: exc.message for rank in range(world_size)}
    return type(exc)(exc.message, failures=failures, phase=exc.phase or phase)


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


class StateChangedError(CheckpointError, RuntimeError):
    """A tensor changed in place while an asynchronous save staged in the background was still
    copying it (before :meth:`~distckpt.handle.SaveHandle.wait_staged` returned); the message
    names the component and the entry. Nothing was committed."""


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
        StateChangedError,
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
