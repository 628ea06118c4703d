"""LoadReport: what a load restored and what it skipped, identical on every rank."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["LoadReport"]


@dataclass(frozen=True)
class LoadReport:
    """Returned by :meth:`CheckpointCoordinator.load_checkpoint` on every rank.

    ``loaded`` lists the component keys restored; ``skipped`` maps keys that
    were not restored to the reason (optional and missing, or not declared
    under ``strict=False``); ``files`` maps each loaded key to the file this
    rank read; ``legacy`` is true for a checkpoint of the original format;
    ``unlisted`` names files in the checkpoint directory that its manifest does
    not list (only possible under ``strict=False``; strict loads refuse them).
    A ``load_checkpoint(missing_ok=True)`` that found nothing to load returns
    ``path == ""``, ``checkpoint_id == ""`` and ``loaded == ()`` on every rank.
    """

    path: str
    checkpoint_id: str
    loaded: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    legacy: bool = False
    unlisted: tuple[str, ...] = ()
