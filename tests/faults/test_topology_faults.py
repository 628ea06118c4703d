"""Loading into another world: a TopologyMismatchError before any data is read, or a
successful load where the pattern allows it (GLOBAL and REPLICATED load anywhere).

The saving world is 2 nodes x 2 procs with a dp=2 x tp=2 mesh. "Before any data is
read" is checked twice: no rank ever enters the ``read`` phase, and the files of
the mismatching components are deleted beforehand (a loader that read first would
report them missing instead).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from distckpt import TopologyMismatchError
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.faults import ranks, scenario
from tests.property import worlds
from tests.property.strategies import Decl, Example, Topo

pytestmark = pytest.mark.timeout(60)

SAVED = scenario.example()


def _topo(nodes: int, procs: int, mesh: tuple[tuple[str, int], ...]) -> Topo:
    return Topo(nodes, procs, tuple(r // procs for r in range(nodes * procs)), mesh)


def _save(tmp_path: Path) -> str:
    return str(worlds.ok(worlds.save(SAVED, str(tmp_path), async_save=False))[0])


def _load_elsewhere(tmp_path: Path, topo: Topo, keys: tuple[str, ...]) -> tuple[list[Any], list[tuple[str, int]]]:
    ex = replace(SAVED, topo=topo, decls=tuple(SAVED.decl(k) for k in keys))
    phases: list[tuple[str, int]] = []
    return worlds.load(ex, str(tmp_path), hook=lambda p, r: phases.append((p, r))), phases


MISMATCHES = [
    ("per_rank into a smaller world", _topo(1, 2, (("dp", 2), ("tp", 1))), ("rng",)),
    ("per_rank into a larger world", _topo(2, 4, (("dp", 2), ("tp", 4))), ("rng",)),
    ("per_node into more nodes of the same world size", _topo(4, 1, (("dp", 2), ("tp", 2))), ("optimizer",)),
    ("per_node into fewer nodes of the same world size", _topo(1, 4, (("dp", 2), ("tp", 2))), ("optimizer",)),
    ("per_group into another dp layout", _topo(2, 2, (("dp", 4), ("tp", 1))), ("model",)),
    ("per_group into a transposed mesh", _topo(2, 2, (("tp", 2), ("dp", 2))), ("model", "dataset")),
    ("every pattern into a smaller world", _topo(1, 2, (("dp", 1), ("tp", 2))),
     ("trainer", "scheduler", "rng", "optimizer", "model", "dataset")),
]


@pytest.mark.parametrize(("case", "topo", "keys"), MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_loading_into_a_different_world_node_count_or_group_layout_fails_before_any_data_is_read(
    tmp_path: Path, case: str, topo: Topo, keys: tuple[str, ...],
) -> None:
    path = _save(tmp_path)
    mismatching = [k for k in keys if SAVED.decl(k).pattern not in ("global", "replicated")]
    for k in mismatching:
        shutil.rmtree(Path(path) / k)
    results, phases = _load_elsewhere(tmp_path, topo, keys)
    assert all(type(r) is TopologyMismatchError for r in results), results
    assert len({str(r) for r in results}) == 1 and results[0].phase == "resolve"
    assert all(f"component {k!r}" in str(results[0]) for k in mismatching), str(results[0])
    assert not [p for p in phases if p[0] == "read"], "data was read before the topology was checked"


@pytest.mark.parametrize("topo", [_topo(1, 1, (("dp", 1),)), _topo(1, 3, (("dp", 3),)), _topo(2, 4, (("dp", 8),))],
                         ids=["world-1", "world-3", "world-8"])
def test_global_and_replicated_state_loads_bit_exact_into_any_world_size(tmp_path: Path, topo: Topo) -> None:
    path = _save(tmp_path)
    ex = replace(SAVED, topo=topo, decls=(SAVED.decl("trainer"), SAVED.decl("scheduler")))
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(ex, str(tmp_path), strict=False))):
        assert report.path == path and set(report.loaded) == {"trainer", "scheduler"}
        scenario.check_loaded(ex, rank, states)


def test_a_per_group_component_whose_group_is_not_passed_at_load_is_a_clear_topology_error(tmp_path: Path) -> None:
    _save(tmp_path)
    ex = replace(SAVED, topo=_topo(2, 2, (("tp", 2), ("pp", 2))), decls=(SAVED.decl("model"),))
    results = worlds.load(ex, str(tmp_path), strict=False)
    assert all(isinstance(r, TopologyMismatchError) and "'dp'" in str(r) for r in results), results


@pytest.mark.multirank
@pytest.mark.timeout(120)
def test_a_real_world_refuses_per_node_state_saved_on_two_nodes_when_loaded_on_one(world_pool: WorldPool, tmp_path: Path) -> None:
    ex = scenario.example(decls=(Decl("optimizer", "per_node"), Decl("trainer", "global")))
    out = str(tmp_path)
    world = world_pool.run(WorldSpec(nodes=2, procs_per_node=2), ranks.save, ex, out, 0, ranks.Fault(), None,
                           ranks.CALM_TIMEOUT, timeout=60)
    assert all(o.ok and "path" in o.value for o in world), [o.describe() for o in world]
    one_node: Example = replace(ex, topo=_topo(1, 4, ex.topo.mesh))
    loaded = world_pool.run(WorldSpec(nodes=1, procs_per_node=4), ranks.load, one_node, out, timeout=60)
    values = [o.value for o in loaded]
    assert all(v.get("error") == "TopologyMismatchError" and v["phase"] == "resolve" for v in values), values
    assert all("read" not in v["phases"] for v in values)
    assert "'optimizer'" in values[0]["message"] and "[[0, 1], [2, 3]]" in values[0]["message"]
