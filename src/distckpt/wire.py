"""What TorchComm's object collectives put on the wire, as steps any driver can run.

An all-gather of pickled objects and a broadcast of one are written here as
generators of two kinds of step, both rooted at rank 0: :class:`Gather`
(every rank sends a tensor of the same size; rank 0 receives them all) and
:class:`Broadcast` (rank 0 sends a tensor; every other rank receives one of
the size and dtype the step names). :class:`~distckpt.torchcomm.TorchComm`
runs the steps on a gloo group; :func:`lockstep` runs a whole world of them
in one process and counts the bytes each rank receives, which is how the tests
and the paper bench measure the plan phase on the wire for worlds too large to
launch. No I/O, no collectives of its own.

The all-gather (:func:`gather_steps`):

* Small worlds (``world x SLOT_BYTES <= SLOTTED_WORLD_BYTES``): every rank
  sends a fixed slot holding its payload's length and, if it fits, the
  payload; rank 0 broadcasts the slots. Two hops, the lowest latency.
* Otherwise, and when a payload does not fit its slot: the lengths first (4
  bytes a rank to rank 0, then 16 bytes from it: the longest and the total),
  then every payload padded to the longest goes to rank 0, which broadcasts
  them packed: each payload's length in as few bytes as the longest needs,
  then the payloads back to back. What a rank other than 0 receives is the
  payloads plus a byte or two per rank; what rank 0 receives is every payload
  padded to the longest, plus 4 bytes per rank. Both grow linearly with the
  world, whatever the slot size.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SLOTTED_WORLD_BYTES",
    "SLOT_BYTES",
    "Broadcast",
    "Gather",
    "broadcast_steps",
    "gather_steps",
    "lockstep",
    "split",
]

SLOT_BYTES = 4096  # per rank, in the one-round all-gather of small worlds, and in a broadcast
#: The one-round slots are used while every rank receives at most this many bytes of them.
SLOTTED_WORLD_BYTES = 256 * 1024
_HEAD = 8  # a slot starts with the payload's length (int64)
_MAX_PAYLOAD = 2**31 - 1  # lengths travel as int32 in the sized rounds


@dataclass(frozen=True)
class Gather:
    """Every rank sends ``send`` (same size everywhere); the driver answers rank 0 with every
    rank's tensor, in rank order, and the other ranks with ``None``."""

    send: torch.Tensor


@dataclass(frozen=True)
class Broadcast:
    """Rank 0 sends ``tensor``; the driver answers every rank with rank 0's bytes, as a tensor
    of ``numel`` elements of ``dtype`` (rank 0 gets its own tensor back)."""

    tensor: torch.Tensor | None
    numel: int
    dtype: torch.dtype


Step = Gather | Broadcast
#: What :func:`gather_steps` ends with: the packed payloads (a uint8 tensor) and how to cut them
#: (:func:`split`): the width of each length field, or 0 for fixed slots.
Gathered = tuple[torch.Tensor, int]


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _slot(data: bytes) -> torch.Tensor:
    slot = torch.zeros(SLOT_BYTES, dtype=torch.uint8)
    slot[:_HEAD] = torch.tensor([len(data)], dtype=torch.int64).view(torch.uint8)
    if 0 < len(data) <= SLOT_BYTES - _HEAD:
        slot[_HEAD:_HEAD + len(data)] = _bytes_tensor(data)
    return slot


def _width(longest: int) -> int:
    """Bytes needed for a length up to ``longest``: 1, 2 or 4."""
    return 1 if longest < 1 << 8 else 2 if longest < 1 << 16 else 4


def gather_steps(rank: int, world: int, data: bytes) -> Generator[Step, Any, Gathered]:
    """The all-gather of ``data`` (this rank's pickle) as steps; see the module docstring.

    Every rank takes the same steps (each decides from what all of them saw).
    Raises ``ValueError`` for a payload of 2 GiB or more, before any step.
    """
    if len(data) > _MAX_PAYLOAD:
        raise ValueError(f"an all-gathered object pickles to {len(data)} bytes; at most {_MAX_PAYLOAD} are supported")
    lengths: torch.Tensor | None = None  # every rank's length, known to rank 0 (to everyone with slots)
    if world * SLOT_BYTES <= SLOTTED_WORLD_BYTES:
        got = yield Gather(_slot(data))
        slots = yield Broadcast(torch.cat(got) if rank == 0 else None, world * SLOT_BYTES, torch.uint8)
        lengths = slots.view(world, SLOT_BYTES)[:, :_HEAD].contiguous().view(torch.int64).flatten()
        longest, total = int(lengths.max()), int(lengths.sum())
        if longest <= SLOT_BYTES - _HEAD:
            return slots, 0
    else:
        got = yield Gather(torch.tensor([len(data)], dtype=torch.int32))
        head = None
        if rank == 0:
            lengths = torch.cat(got).to(torch.int64)
            head = torch.tensor([int(lengths.max()), int(lengths.sum())], dtype=torch.int64)
        head = yield Broadcast(head, 2, torch.int64)
        longest, total = (int(v) for v in head)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:len(data)] = _bytes_tensor(data)
    got = yield Gather(padded)
    width = _width(longest)
    packed = _pack(got, lengths, width) if rank == 0 else None
    packed = yield Broadcast(packed, world * width + total, torch.uint8)
    return packed, width


def _pack(rows: Sequence[torch.Tensor], lengths: torch.Tensor | None, width: int) -> torch.Tensor:
    """Rank 0: every payload's length (``width`` bytes, little-endian), then the payloads back to back."""
    assert lengths is not None
    matrix = torch.stack(list(rows))
    keep = torch.arange(matrix.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    sizes = torch.from_numpy(lengths.numpy().astype(f"<u{width}").view("u1").copy())
    return torch.cat([sizes, matrix[keep]])


def split(gathered: Gathered, world: int) -> list[bytes]:
    """Every rank's payload from what :func:`gather_steps` returned."""
    buffer, width = gathered
    raw = buffer.numpy().tobytes()
    if width == 0:
        out = []
        for r in range(world):
            at = r * SLOT_BYTES
            n = int.from_bytes(raw[at:at + _HEAD], "little", signed=True)
            out.append(raw[at + _HEAD:at + _HEAD + n])
        return out
    sizes = [int.from_bytes(raw[i:i + width], "little") for i in range(0, world * width, width)]
    out, at = [], world * width
    for n in sizes:
        out.append(raw[at:at + n])
        at += n
    return out


def broadcast_steps(rank: int, data: bytes) -> Generator[Step, Any, bytes]:
    """Rank 0's ``data`` to every rank: one slot announcing the length and holding the payload if
    it fits, else a second broadcast of exactly the payload."""
    slot = yield Broadcast(_slot(data) if rank == 0 else None, SLOT_BYTES, torch.uint8)
    size = int(slot[:_HEAD].view(torch.int64)[0])
    if size <= SLOT_BYTES - _HEAD:
        return bytes(slot[_HEAD:_HEAD + size].numpy()) if rank != 0 else data
    payload = yield Broadcast(_bytes_tensor(data) if rank == 0 else None, size, torch.uint8)
    return data if rank == 0 else bytes(payload.numpy())


def lockstep(steps: Sequence[Generator[Step, Any, Any]], received: list[int]) -> list[Any]:
    """Run one generator per rank in step with each other, as one world would; returns what each ended with.

    Adds to ``received[r]`` the bytes rank ``r`` receives from the others (a
    gather's tensors at rank 0, a broadcast's at every other rank). Nothing is
    copied: every rank gets rank 0's broadcast tensor itself (read-only, as the
    steps treat it), so a world of 16,384 costs what its payloads do. Raises
    ``RuntimeError`` when ranks take different steps or send different sizes
    (a protocol bug, which a real world would turn into a hang or a crash).
    """
    world = len(steps)
    answers: list[Any] = [None] * world
    results: list[Any] = [None] * world
    live = list(range(world))
    while live:
        taken: dict[int, Step] = {}
        for r in live:
            try:
                taken[r] = steps[r].send(answers[r])
            except StopIteration as stop:
                results[r] = stop.value
        if taken and len(taken) != len(live):
            raise RuntimeError("ranks ended the collective after different numbers of steps")
        live = sorted(taken)
        if not live:
            break
        first = taken[live[0]]
        if any(type(s) is not type(first) for s in taken.values()):
            raise RuntimeError("ranks took different kinds of step")
        if isinstance(first, Gather):
            sizes = {s.send.numel() * s.send.element_size() for s in taken.values()}  # type: ignore[union-attr]
            if len(sizes) != 1:
                raise RuntimeError(f"ranks gathered tensors of different sizes: {sorted(sizes)}")
            received[0] += sizes.pop() * (world - 1)
            answers = [None] * world
            answers[0] = [taken[r].send for r in range(world)]  # type: ignore[union-attr]
        else:
            root = taken[0].tensor  # type: ignore[union-attr]
            assert root is not None
            nbytes = root.numel() * root.element_size()
            for r in range(1, world):
                want = taken[r]
                assert isinstance(want, Broadcast)
                if want.numel != root.numel() or want.dtype != root.dtype:
                    raise RuntimeError(f"rank {r} expected {want.numel} x {want.dtype} from a broadcast of "
                                       f"{root.numel()} x {root.dtype}")
                received[r] += nbytes
            answers = [root] * world
    return results
