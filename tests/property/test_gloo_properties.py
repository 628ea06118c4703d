"""A modest number of hypothesis examples on real multi-process gloo worlds.

Examples are drawn here, in the parent, and shipped to the ranks of a warm world
from the harness pool; the ranks only materialise their own states. Topologies
are torchrun-numbered (1-2 nodes x 1-4 procs), process groups are real gloo
groups or a DeviceMesh with named dimensions.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from distckpt.testing.pool import WorldPool, WorldSpec
from tests.property import gloo_ranks, worlds
from tests.property.strategies import Decl, Example, examples, ship, unship

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(300)]

#: Examples per gloo property (each is a real world): 16 round trips and 8 faults per phase in "ci".
GLOO_EXAMPLES = min(16, settings().max_examples)
GLOO_FAULT_EXAMPLES = min(8, settings().max_examples)


def _spec(ex: Example) -> WorldSpec:
    return WorldSpec(nodes=ex.topo.nodes, procs_per_node=ex.topo.procs_per_node)


@settings(max_examples=GLOO_EXAMPLES)
@given(examples(max_nodes=2, max_procs=4, contiguous=True, extra=1, max_leaves=4), st.booleans())
def test_on_gloo_the_files_manifest_and_loaded_state_match_the_oracle_for_every_pattern(
    world_pool: WorldPool, ex: Example, use_mesh: bool,
) -> None:
    assert all(diff is None for diff in _shipping_diffs(ex))
    event(f"world {ex.topo.world_size}, {'DeviceMesh' if use_mesh else 'process groups'}")
    with worlds.scratch() as out:
        outcomes = world_pool.run(_spec(ex), gloo_ranks.round_trip, ship(ex), out, use_mesh, timeout=120)
        assert all(o.ok for o in outcomes), "\n".join(o.describe() for o in outcomes if not o.ok)
        values = [o.value for o in outcomes]
        assert len({v["path"] for v in values}) == 1 and all(v["loaded"] == v["path"] for v in values)
        assert [p for v in values for p in v["problems"]] == []


@pytest.mark.parametrize("phase", ["plan", "validate", "write", "commit"])
@settings(max_examples=GLOO_FAULT_EXAMPLES)
@given(examples(max_nodes=2, max_procs=4, contiguous=True, extra=0, max_leaves=3), st.data())
def test_on_gloo_an_exception_in_any_phase_on_any_rank_fails_every_rank_naming_it_and_keeps_the_previous_checkpoint(
    world_pool: WorldPool, phase: str, ex: Example, data: st.DataObject,
) -> None:
    if phase == "validate" and not any(d.validated(ex.save_validate) for d in ex.decls):
        d = next(d for d in ex.decls if d.pattern == "replicated")  # make sure the phase runs
        ex = ex.with_decl(Decl(d.key, d.pattern, d.group, True, "tensor", d.required))
    victim = data.draw(st.integers(0, ex.topo.world_size - 1))
    event(f"world {ex.topo.world_size}, victim {victim}")
    with worlds.scratch() as out:
        outcomes = world_pool.run(_spec(ex), gloo_ranks.fault_in_phase, ship(ex), out, phase, victim, timeout=120)
        assert all(o.ok for o in outcomes), "\n".join(o.describe() for o in outcomes if not o.ok)
        values = [o.value for o in outcomes]
        previous = values[0]["previous"]
        for v in values:
            assert v.get("error") == "CrossRankError", v
            assert v["failures"] == {victim: f"InjectedFault: injected in {phase} on rank {victim}"}
            assert v["listing"] == [os.path.basename(previous)]
            assert v["loaded"] == previous and v["problems"] == []
        assert len({v["message"] for v in values}) == 1


def _shipping_diffs(ex: Example) -> list[str | None]:
    """What a rank materialises from the shipped example is bit-exactly what the parent would."""
    from tests.property import exact

    back = unship(ship(ex))
    return [exact.diff(ex.state(d.key, r), back.state(d.key, r)) for d in ex.decls for r in range(ex.topo.world_size)]
