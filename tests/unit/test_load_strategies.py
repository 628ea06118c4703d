"""Load strategies: every member reads, or the lowest rank of each set reads and broadcasts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import CheckpointCoordinator, IntegrityError, StateComponent
from distckpt.codec import encode
from distckpt.testing import ThreadComm
from tests.helpers import Box, all_ok, mesh_groups, threads

NODES = [0, 0, 1, 1]
DECL = [("global", "global"), ("replicated", "replicated"), ("per_rank", "per_rank"),
        ("per_node", "per_node"), ("dp", "per_group"), ("tp", "per_group")]


def state_for(key: str, rank: int) -> dict[str, Any]:
    groups = mesh_groups(rank, [("dp", 2), ("tp", 2)])
    tag = {"global": 0, "replicated": 0, "per_rank": rank, "per_node": 100 + NODES[rank]}.get(key)
    if tag is None:
        tag = 1000 + min(groups[key])
    g = torch.Generator().manual_seed(tag)
    return {"w": torch.randn(50, 30, generator=g), "b": torch.randn(7, generator=g).bfloat16(), "tag": tag}


def coordinator(comm: ThreadComm, out: Path, states: dict[str, Any], **kw: Any) -> CheckpointCoordinator:
    comps = [StateComponent(k, Box(states.get(k)), p, process_group_name=k if p == "per_group" else None)
             for k, p in DECL]
    return CheckpointCoordinator(comps, process_groups=mesh_groups(comm.rank, [("dp", 2), ("tp", 2)]), dist=comm,
                                 output_dir=out, **kw)


@pytest.mark.parametrize("min_part_bytes", [None, 2048], ids=["whole-files", "balanced"])
def test_read_and_broadcast_restores_exactly_what_every_member_reads_restores(
        tmp_path: Path, min_part_bytes: int | None) -> None:
    def save(comm: ThreadComm) -> str:
        states = {k: state_for(k, comm.rank) for k, _ in DECL}
        return coordinator(comm, tmp_path, states, min_part_bytes=min_part_bytes).save_checkpoint()

    all_ok(threads(4, save, nodes=NODES))

    def load(comm: ThreadComm, strategy: str) -> dict[str, bytes]:
        c = coordinator(comm, tmp_path, {}, load_strategy=strategy)
        report = c.load_checkpoint()
        assert report.loaded == tuple(sorted(k for k, _ in DECL))
        return {x.key: encode(x.stateful.state).to_bytes() for x in c.components}  # type: ignore[attr-defined]

    broadcast = all_ok(threads(4, lambda c: load(c, "read_and_broadcast"), nodes=NODES))
    each = all_ok(threads(4, lambda c: load(c, "every_member_reads"), nodes=NODES))
    assert broadcast == each
    for rank in range(4):
        assert all(broadcast[rank][k] == encode(state_for(k, rank)).to_bytes() for k, _ in DECL)


def test_read_and_broadcast_names_the_reader_of_a_damaged_file_on_every_rank(tmp_path: Path) -> None:
    def save(comm: ThreadComm) -> str:
        return coordinator(comm, tmp_path, {k: state_for(k, comm.rank) for k, _ in DECL}).save_checkpoint()

    path = all_ok(threads(4, save, nodes=NODES))[0]
    victim = Path(path) / "dp" / "dp-001.safetensors"  # set [1, 3]: rank 1 reads it
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    results = threads(4, lambda c: coordinator(c, tmp_path, {}, load_strategy="read_and_broadcast").load_checkpoint(),
                      nodes=NODES)
    assert all(type(r) is IntegrityError and r.failures.keys() == {1} for r in results), results
    assert all("dp-001.safetensors: checksum mismatch" in r.failures[1] for r in results)


def test_an_unknown_load_strategy_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="every_member_reads"):
        CheckpointCoordinator([], load_strategy="guess")
