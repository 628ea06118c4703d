"""Transport: what the coordinator needs from a world of ranks, and the worlds distckpt provides.

Called by the coordinator's facade (:func:`default_comm`, at construction, and
:func:`check_comm`) and, through the :class:`Comm` it gets, by the error
protocol of :mod:`distckpt.collectives`. This module knows nothing about
errors crossing ranks; it moves objects and tensors.

- :class:`Comm`: what every save and load needs (rank, world size, an
  all-gather and a broadcast of objects, group membership, node identity).
- :class:`ForkingComm`: a Comm that can give an asynchronous save a channel
  of its own (:meth:`~ForkingComm.fork`), and says when its last collective
  failed (:attr:`~ForkingComm.broken`). Needed by ``save_checkpoint(async_save=True)``.
- :class:`SetBroadcastComm`: a Comm that can broadcast tensors within replica
  sets. Needed by ``load_strategy="read_and_broadcast"``, checked when the
  coordinator is constructed.

:class:`LocalComm` (a world of one) and :class:`~distckpt.torchcomm.TorchComm`
(torch.distributed, on gloo groups of its own) implement all three;
:class:`distckpt.testing.ThreadComm` (threads) does too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .torchcomm import TorchComm, local_node_id

__all__ = [
    "Comm",
    "ForkingComm",
    "LocalComm",
    "SetBroadcastComm",
    "TorchComm",
    "check_comm",
    "default_comm",
    "local_node_id",
]


@runtime_checkable
class Comm(Protocol):
    """What the coordinator needs from a world: who am I, and an all-gather of objects."""

    rank: int
    world_size: int

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        """Collective: every rank's ``obj``, indexed by rank. Raises CollectiveTimeoutError."""
        ...

    def broadcast(self, obj: Any, phase: str) -> Any:
        """Collective: rank 0's ``obj`` on every rank. Raises CollectiveTimeoutError."""
        ...

    def group_members(self, group: Any) -> tuple[int, ...]:
        """Global ranks of ``group`` (a process group this rank belongs to). Local."""
        ...

    def node_id(self) -> str:
        """This rank's node identity (ranks with equal ids share a node). Local."""
        ...


@runtime_checkable
class ForkingComm(Comm, Protocol):
    """A :class:`Comm` that can give an asynchronous save a channel of its own."""

    @property
    def broken(self) -> bool:
        """Whether this channel's last collective failed (it is then replaced by a fresh fork)."""
        ...

    def fork(self) -> ForkingComm:
        """Collective: an independent channel among the same ranks (ranks fork in the same order)."""
        ...


@runtime_checkable
class SetBroadcastComm(Comm, Protocol):
    """A :class:`Comm` that can broadcast tensors within replica sets."""

    def broadcast_in_sets(self, sets: Sequence[tuple[int, ...]], tensors: Sequence[Any], phase: str) -> None:
        """Collective over the world: ``tensors`` of the lowest rank of this rank's set reach every member.

        ``sets`` (identical on every rank) partition the world; the tensors are
        filled in place on the other members. Raises CollectiveTimeoutError.
        """
        ...


class LocalComm:
    """A world of one process: collectives are identities."""

    rank = 0
    world_size = 1
    broken = False

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        return [obj]

    def broadcast(self, obj: Any, phase: str) -> Any:
        return obj

    def group_members(self, group: Any) -> tuple[int, ...]:
        return (0,)

    def node_id(self) -> str:
        return local_node_id()

    def fork(self) -> LocalComm:
        return LocalComm()

    def broadcast_in_sets(self, sets: Sequence[tuple[int, ...]], tensors: Sequence[Any], phase: str) -> None:
        """A world of one has only singleton sets: nothing to send."""


def default_comm(dist: Any, timeout: float) -> Comm:
    """The world the coordinator runs in.

    ``dist`` may be a :class:`Comm` (used as is), or ``None`` / any other object
    (then torch.distributed when initialized with more than one rank, else a
    world of one).
    """
    if isinstance(dist, Comm) and callable(dist.all_gather):
        return dist
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
        return TorchComm(timeout)
    return LocalComm()


def check_comm(comm: Comm, needed: type[ForkingComm] | type[SetBroadcastComm], what: str) -> None:
    """Raise ``TypeError`` naming what ``comm`` lacks when it does not implement ``needed``.

    Called by the facade: at construction for ``load_strategy="read_and_broadcast"``
    (:class:`SetBroadcastComm`), at the start of ``save_checkpoint(async_save=True)``
    (:class:`ForkingComm`), before any collective or file.
    """
    if isinstance(comm, needed):
        return
    members = "fork() and broken" if needed is ForkingComm else "broadcast_in_sets()"
    raise TypeError(
        f"{what} needs a Comm implementing distckpt.transport.{needed.__name__} ({members}); "
        f"{type(comm).__name__} does not"
    )
