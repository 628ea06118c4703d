"""What a rank receives on the wire from TorchComm's object collectives, counted tensor by tensor.

:func:`distckpt.wire.lockstep` runs the very steps :class:`~distckpt.torchcomm.TorchComm`
hands to gloo for every rank of a simulated world and counts the bytes of the
tensors each rank receives, padding included. The plan phase of a save
(:func:`distckpt.saving.plan`) runs on rank 0 with a comm whose collectives go
through those steps, every peer contributing what it would send
(:class:`tests.unit.test_plan_phase_bytes.CountingComm` builds the peers' reports).
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from distckpt import wire
from tests.unit.test_plan_phase_bytes import CountingComm, components, run_plan_phase

MIB = 1024 * 1024


def _gather(payloads: list[bytes]) -> tuple[list[list[bytes]], list[int]]:
    world = len(payloads)
    received = [0] * world
    ends = wire.lockstep([wire.gather_steps(r, world, payloads[r]) for r in range(world)], received)
    return [wire.split(end, world) for end in ends], received


@pytest.mark.parametrize("slotted", [True, False])
@pytest.mark.parametrize("sizes", [[0, 0, 0], [5, 70, 4088], [10, 100_000, 3], [1, 300, 70_000, 2]])
def test_every_rank_ends_with_every_payload_whichever_rounds_carry_them(
        monkeypatch: pytest.MonkeyPatch, slotted: bool, sizes: list[int]) -> None:
    monkeypatch.setattr(wire, "SLOTTED_WORLD_BYTES", 1 << 30 if slotted else 0)
    payloads = [bytes([r + 1]) * n for r, n in enumerate(sizes)]
    ends, _ = _gather(payloads)
    assert ends == [payloads] * len(sizes)


def test_the_sized_rounds_pad_nothing_beyond_the_longest_payload_and_send_a_byte_of_length_per_peer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SLOTTED_WORLD_BYTES", 0)
    payloads = [b"x" * (100 + r % 3) for r in range(64)]
    _, received = _gather(payloads)
    total = sum(map(len, payloads))
    assert received[0] == 63 * 4 + 63 * 102  # lengths (int32), then each peer's payload padded to the longest
    assert received[1:] == [16 + 64 * 1 + total] * 63  # longest and total, one length byte per rank, payloads


def test_fixed_slots_are_counted_as_the_padding_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SLOTTED_WORLD_BYTES", 1 << 40)  # the one-round slots at any world (the old protocol)
    _, received = _gather([b"x" * 80] * 512)
    assert min(received[1:]) == 512 * wire.SLOT_BYTES


def test_a_broadcast_receives_one_slot_or_one_slot_and_the_exact_payload() -> None:
    for size in (3, 10_000):
        received = [0] * 4
        ends = wire.lockstep([wire.broadcast_steps(r, b"y" * size if r == 0 else b"") for r in range(4)], received)
        assert ends == [b"y" * size] * 4
        assert received == [0] + [wire.SLOT_BYTES + (size if size > wire.SLOT_BYTES else 0)] * 3


def test_ranks_taking_different_steps_are_a_protocol_error_not_a_silent_count() -> None:
    steps = [wire.gather_steps(0, 2, b"a"), wire.broadcast_steps(1, b"")]
    with pytest.raises(RuntimeError, match="different kinds of step"):
        wire.lockstep(steps, [0, 0])


class WireComm(CountingComm):
    """Rank 0 of a world whose collectives run TorchComm's steps; counts what every rank receives."""

    def __init__(self, world: int, comps: list[Any]) -> None:
        super().__init__(world, comps)
        self.wire = [0] * world

    def all_gather(self, obj: Any, phase: str) -> list[Any]:
        before = self.received
        objects = super().all_gather(obj, phase)  # every rank's object, as each would build it
        self.received = before
        payloads = [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in objects]
        ends = wire.lockstep([wire.gather_steps(r, self.world_size, payloads[r]) for r in range(self.world_size)],
                             self.wire)
        for r in (0, 1, self.world_size - 1):  # what the ranks decode is what was sent
            assert [pickle.loads(p) for p in wire.split(ends[r], self.world_size)] == objects
        return objects

    def broadcast(self, obj: Any, phase: str) -> Any:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        ends = wire.lockstep([wire.broadcast_steps(r, data if r == 0 else b"") for r in range(self.world_size)],
                             self.wire)
        assert pickle.loads(ends[-1]) == obj
        return obj


def wire_bytes_of_the_plan_phase(world: int) -> list[int]:
    comm = WireComm(world, components())
    run_plan_phase(comm, world)
    return comm.wire


@pytest.mark.timeout(300)
def test_on_the_wire_every_rank_receives_under_2_mib_in_the_plan_phase_at_16384_ranks_growing_linearly() -> None:
    small, large = wire_bytes_of_the_plan_phase(1024), wire_bytes_of_the_plan_phase(16384)
    print("plan phase on the wire, max per rank:", max(small), max(large))
    assert max(large) <= 2 * MIB
    assert max(large) / 16384 <= max(small) / 1024 * 1.05  # the same bytes per peer: linear
    assert min(large[1:]) > 16384 * 64  # it did count the reports (some 70 bytes from each peer)
