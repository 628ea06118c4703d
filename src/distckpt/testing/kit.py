"""``check_pattern``: property-test a sharing pattern in a few lines.

Called from a user's test (pytest or any runner)::

    from distckpt.testing import check_pattern
    from mypkg.patterns import PerLocalRank

    def test_per_local_rank_keeps_every_promise():
        check_pattern(PerLocalRank())

Over drawn topologies (:func:`~distckpt.testing.topologies`) and state dicts it
checks, for every example, that

1. ``replica_sets`` is deterministic and partitions the world, and
   ``cls(**params())`` rebuilds an equal pattern;
2. a save writes one file per replica set (or its balanced parts) by the
   set's lowest rank, exactly the files the manifest lists, with exact sets,
   writers, sizes and checksums (recomputed here from the bytes on disk);
3. every rank loads its own set's state bit-exactly;
4. with ``identical_replicas``, one changed element on one member is caught
   on every rank and nothing commits;
5. an exception on any rank in any phase fails every rank and nothing commits.

Threaded worlds by default; ``processes=True`` runs each example on a real gloo
world of warm processes (:mod:`distckpt.testing.gloo`). A failure is raised
as ``AssertionError`` after hypothesis has shrunk it, naming the topology and
the ranks. This module reads the checkpoint's files directly (not through
``distckpt.storage``) so that its checks are independent of the code they test.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import xxhash
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ..manifest import MANIFEST_NAME, CheckpointManifest
from ..patterns import Pattern, registered_patterns, same_definition
from ..topology import Topology
from . import worlds
from ._rankside import KEY, rank_step
from .strategies import StateSpec, state_specs, topologies

__all__ = ["check_pattern", "describe_topology"]

PatternSource = Pattern | Callable[[Topology], Pattern]
Runner = Callable[[Topology, Pattern, Sequence[Sequence[int]], StateSpec, str, dict[str, Any]], list[dict[str, Any]]]
_PHASES = ("plan", "validate", "write", "commit")


def describe_topology(topology: Topology) -> str:
    """``world 5, nodes [[0, 1, 2], [3, 4]], dp [[0, 3], [1, 4], [2]]``: for failure messages."""
    parts = [f"world {topology.world_size}", f"nodes {[list(n) for n in topology.nodes]}"]
    parts += [f"{name} {[list(s) for s in part]}" for name, part in topology.groups.items()]
    return ", ".join(parts)


def check_pattern(pattern_or_factory: PatternSource, *, max_examples: int = 100, processes: bool = False,
                  max_world: int | None = None, shrink: bool = True) -> None:
    """Property-test a pattern (or a factory ``Callable[[Topology], Pattern]``, e.g. to pick one
    of the drawn group names) over drawn topologies and state dicts; see the module docstring.

    Runs in the caller's process (threads) or on gloo worlds of warm processes
    (``processes=True``; worlds up to 8 ranks unless ``max_world`` says otherwise).
    Raises ``AssertionError`` with a shrunk counterexample when a promise breaks;
    ``shrink=False`` raises the first one found, unshrunk (every shrinking step runs a save
    and a load: a test that only expects the failure is much faster without it).
    """
    limit = max_world if max_world is not None else (8 if processes else 16)
    runner: Runner = _gloo_runner() if processes else _thread_runner

    @settings(max_examples=max_examples, deadline=None, database=None, print_blob=False,
              phases=tuple(p for p in Phase if shrink or p is not Phase.shrink),
              suppress_health_check=list(HealthCheck))
    @given(topology=topologies(max_world=limit), spec=state_specs(max_tensors=4), data=st.data())
    def examples(topology: Topology, spec: StateSpec, data: st.DataObject) -> None:
        pattern = _pattern_for(pattern_or_factory, topology)
        sets = _check_partition(pattern, topology)
        _run_example(runner, topology, pattern, sets, spec, data)

    examples()


def _pattern_for(source: PatternSource, topology: Topology) -> Pattern:
    pattern = source if isinstance(source, Pattern) else source(topology)
    assert isinstance(pattern, Pattern), f"the factory gave {pattern!r}, not a Pattern"
    cls = registered_patterns().get(pattern.kind)
    assert cls is not None and (cls is type(pattern) or same_definition(cls, type(pattern))), (f"{type(pattern).__name__} (kind {pattern.kind!r}) is not registered; "
                                  "decorate it with @distckpt.register_pattern")
    params = pattern.params()
    assert json.loads(json.dumps(params)) == params, f"params() {params!r} is not plain JSON"
    rebuilt = cls(**params)
    assert rebuilt == pattern and rebuilt.params() == params, (
        f"{cls.__name__}(**{params!r}) gives {rebuilt!r}, not an equal pattern")
    return pattern


def _check_partition(pattern: Pattern, topology: Topology) -> list[tuple[int, ...]]:
    """The pattern's sets, checked here independently: deterministic, non-empty, disjoint, covering."""
    where = f"{pattern.describe()} on {describe_topology(topology)}"
    first = [tuple(s) for s in pattern.replica_sets(topology)]
    again = [tuple(s) for s in pattern.replica_sets(topology)]
    assert first == again, f"{where}: replica_sets gave {first} and then {again}; it must be deterministic"
    seen: dict[int, tuple[int, ...]] = {}
    for members in first:
        assert members, f"{where}: an empty replica set in {first}"
        for rank in members:
            assert isinstance(rank, int) and 0 <= rank < topology.world_size, f"{where}: rank {rank!r} is not in the world"
            assert rank not in seen, f"{where}: rank {rank} is in two sets, {seen[rank]} and {members}"
            seen[rank] = members
    missing = sorted(set(range(topology.world_size)) - set(seen))
    assert not missing, f"{where}: ranks {missing} are in no replica set"
    return sorted((tuple(sorted(s)) for s in first), key=lambda s: s[0])


def _run_example(runner: Runner, topology: Topology, pattern: Pattern, sets: list[tuple[int, ...]],
                 spec: StateSpec, data: st.DataObject) -> None:
    where = f"{pattern.describe()} on {describe_topology(topology)}"
    out = tempfile.mkdtemp(prefix="distckpt-kit-")
    try:
        min_part = data.draw(st.sampled_from([None, 1, 4096]), label="min_part_bytes")
        validate = pattern.identical_replicas and any(len(s) > 1 for s in sets)
        results = runner(topology, pattern, sets, spec, out,
                         {"kind": "save", "validate": validate, "min_part_bytes": min_part})
        paths = _all_ok(results, f"{where}: save")
        assert len(set(paths)) == 1, f"{where}: ranks returned different paths {paths}"
        path = paths[0]
        _check_files(path, pattern, sets, f"{where}: {path}")
        loaded = runner(topology, pattern, sets, spec, out, {"kind": "load"})
        _all_ok(loaded, f"{where}: load")
        for rank, r in enumerate(loaded):
            assert r["diff"] is None, f"{where}: rank {rank} loaded state that differs from its set's: {r['diff']}"
        listing = _listing(out)
        if validate:
            multi = [s for s in sets if len(s) > 1]
            members = data.draw(st.sampled_from(multi), label="set with a changed replica")
            victim = data.draw(st.sampled_from(members), label="rank holding the changed element")
            results = runner(topology, pattern, sets, spec, out,
                             {"kind": "save", "validate": True, "perturb": victim, "min_part_bytes": min_part})
            _all_failed(results, "ReplicationMismatchError", members, f"{where}: a changed element on rank {victim}")
            assert _listing(out) == listing, f"{where}: a failed validation left {_listing(out)} (had {listing})"
        phases = [p for p in _PHASES if p != "validate" or validate]
        phase = data.draw(st.sampled_from(phases), label="phase of the fault")
        victim = data.draw(st.integers(0, topology.world_size - 1), label="rank that raises")
        results = runner(topology, pattern, sets, spec, out,
                         {"kind": "save", "validate": validate, "fault": [phase, victim], "min_part_bytes": min_part})
        _all_failed(results, None, (victim,), f"{where}: an exception in {phase} on rank {victim}")
        assert _listing(out) == listing, f"{where}: a failed save left {_listing(out)} (had {listing})"
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _all_ok(results: list[dict[str, Any]], where: str) -> list[str]:
    failed = {rank: r for rank, r in enumerate(results) if "error" in r}
    assert not failed, f"{where} failed: " + "; ".join(f"rank {k}: {v['error']}: {v['message']}" for k, v in failed.items())
    return [r["path"] for r in results]


def _all_failed(results: list[dict[str, Any]], error: str | None, culprits: Sequence[int], where: str) -> None:
    """Every rank failed with ``error`` (any class when ``None``), naming only ranks of ``culprits``."""
    allowed = {str(r) for r in culprits}
    for rank, r in enumerate(results):
        assert "error" in r, f"{where}: rank {rank} did not fail (it saved {r.get('path')})"
        assert error is None or r["error"] == error, f"{where}: rank {rank} raised {r['error']}, not {error}: {r['message']}"
        named = set(r["failures"])
        assert named and named <= allowed, (
            f"{where}: rank {rank}'s error names ranks {sorted(named)}, expected some of {sorted(allowed)}: {r['failures']}")


def _listing(out: str) -> list[str]:
    """Every entry of the checkpoints folder, hidden ones (staging) included."""
    folder = os.path.join(out, "checkpoints")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _check_files(path: str, pattern: Pattern, sets: list[tuple[int, ...]], where: str) -> None:
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    comp = manifest["components"][KEY]
    assert comp["pattern"] == {"kind": pattern.kind, "params": pattern.params()}, f"{where}: pattern {comp['pattern']}"
    saved_sets = [tuple(s) for s in comp["replicated_across"]]
    assert saved_sets == sets, f"{where}: manifest sets {saved_sets}, pattern gives {sets}"
    # The files as the library reads them: a component of many files lists them as a
    # ``file_table`` of columns (format 1.4), which the reader turns back into entries.
    saved = CheckpointManifest.load(os.path.join(path, MANIFEST_NAME)).components[KEY].files
    files: list[dict[str, Any]] = [
        {"path": e.path, "ranks": list(e.ranks), "writer": e.writer, "size_bytes": e.size_bytes,
         "checksum": e.checksum, **({"part": [e.part, e.parts]} if e.parts > 1 else {})} for e in saved]
    by_set: dict[tuple[int, ...], list[dict[str, Any]]] = {}
    for entry in files:
        by_set.setdefault(tuple(entry["ranks"]), []).append(entry)
    assert sorted(by_set) == sorted(sets), f"{where}: files cover sets {sorted(by_set)}, not {sets}"
    for members in sets:
        entries = sorted(by_set[members], key=lambda e: e.get("part", [0, 1])[0])
        writers = [e["writer"] for e in entries]
        assert writers[0] == min(members), f"{where}: set {list(members)} is written by {writers[0]}, not its lowest rank"
        assert len(set(writers)) == len(writers) and set(writers) <= set(members), (
            f"{where}: set {list(members)} has writers {writers}")
        if len(entries) > 1:
            assert pattern.identical_replicas, f"{where}: set {list(members)} of a pattern without identical replicas was split"
            assert [e["part"] for e in entries] == [[i, len(entries)] for i in range(len(entries))], f"{where}: parts {entries}"
    assert sorted(comp["ranks"]) == sorted({e["writer"] for e in files}), f"{where}: writers {comp['ranks']}"
    listed = {e["path"] for e in files}
    on_disk = {f"{KEY}/{name}" for name in os.listdir(os.path.join(path, KEY))}
    assert on_disk == listed, f"{where}: files on disk {sorted(on_disk)}, manifest lists {sorted(listed)}"
    assert sorted(os.listdir(path)) == sorted(["manifest.json", KEY]), f"{where}: entries {sorted(os.listdir(path))}"
    for entry in files:
        with open(os.path.join(path, entry["path"]), "rb") as f:
            raw = f.read()
        assert len(raw) == entry["size_bytes"], f"{where}: {entry['path']} is {len(raw)} bytes, manifest says {entry['size_bytes']}"
        algorithm, _, digest = entry["checksum"].partition(":")
        assert algorithm == "xxh3-128" and xxhash.xxh3_128_hexdigest(raw) == digest, f"{where}: {entry['path']} checksum"
    assert comp["size_bytes"] == sum(e["size_bytes"] for e in files), f"{where}: component size_bytes"


def _thread_runner(topology: Topology, pattern: Pattern, sets: Sequence[Sequence[int]], spec: StateSpec, out: str,
                   op: dict[str, Any]) -> list[dict[str, Any]]:
    world = worlds.ThreadWorld(topology.world_size, nodes=[topology.node_of(r) for r in range(topology.world_size)],
                               timeout=30.0)

    def step(comm: worlds.ThreadComm) -> dict[str, Any]:
        groups = {name: next(s for s in part if comm.rank in s) for name, part in topology.groups.items()}
        return rank_step(comm.rank, pattern, sets, spec, out, op, comm, groups)

    results = worlds.run_threads(world, step)
    for rank, r in enumerate(results):
        if isinstance(r, BaseException):
            raise AssertionError(f"rank {rank} raised outside the error protocol: {type(r).__name__}: {r}") from r
    return [r for r in results if isinstance(r, dict)]


def _gloo_runner() -> Runner:
    from .gloo import run_on_gloo

    return run_on_gloo
