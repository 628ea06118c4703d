"""Properties 1-6 of issue 4 on threaded worlds, each over every pattern.

Every drawn example declares one component of every pattern (GLOBAL,
REPLICATED, PER_RANK, PER_NODE, PER_GROUP over a random mesh dimension) plus
random extras, so each property is checked for every pattern in every example.
The expected files, writers and replica sets come from ``harness.oracle``
(topology and declarations only), never from distckpt's own layout code.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections import OrderedDict
from typing import Any

import pytest
import safetensors
import torch
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

from distckpt import (
    CheckpointCoordinator,
    CrossRankError,
    IntegrityError,
    ReplicationMismatchError,
    StateComponent,
)
from distckpt.codec import decode
from distckpt.digests import entry_name
from harness import oracle
from tests.helpers import Box
from tests.property import exact, worlds
from tests.property.strategies import (
    PATTERNS,
    Decl,
    Example,
    Topo,
    decl_files,
    decl_set_index,
    decl_sets,
    examples,
    hostile_names,
    is_safe_name,
    topologies,
    valid_names,
)

pytestmark = [
    pytest.mark.timeout(240),
    # complex32 is among the dtypes covered on purpose; torch warns once that it is experimental
    pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning"),
]


def _events(ex: Example) -> None:
    event(f"world {ex.topo.world_size} ({ex.topo.nodes} nodes x {ex.topo.procs_per_node})")
    event(f"mesh dims {len(ex.topo.mesh)}")
    event("save " + ("async, staged in the background" if ex.background_staging else
                     "async" if ex.async_save else "sync"))
    for d in ex.decls:
        event(f"pattern {d.pattern}" + (" validated" if d.validated(ex.save_validate) else ""))
    note(f"topology {ex.topo}; declarations {ex.decls}")


# ------------------------------------------------------------------ property 1

@given(examples())
def test_property_1_the_files_written_are_exactly_the_files_the_oracle_derives(ex: Example) -> None:
    _events(ex)
    with worlds.scratch() as out:
        paths = worlds.ok(worlds.save(ex, out))
        assert len(set(paths)) == 1, paths
        path = paths[0]
        assert path == os.path.join(os.path.abspath(out), "checkpoints", "checkpoint-1")
        expected = {"manifest.json"} | {f for d in ex.decls for f, _, _ in decl_files(d, ex.topo)}
        assert oracle.checkpoint_files(path) == expected
        assert worlds.checkpoints_listing(out) == ["checkpoint-1"]  # no staging left behind


# ------------------------------------------------------------------ property 2

@given(examples())
def test_property_2_the_manifest_lists_the_right_writers_sets_sizes_and_checksums(ex: Example) -> None:
    _events(ex)
    with worlds.scratch() as out:
        path = worlds.ok(worlds.save(ex, out))[0]
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)  # the plain JSON, not distckpt's parser
        assert m["format"] == "distckpt" and m["world_size"] == ex.topo.world_size
        assert m["topology"]["nodes"] == [list(s) for s in ex.topo.world.nodes]
        assert m["topology"]["groups"] == {n: [list(s) for s in oracle.mesh_partition(ex.topo.mesh, n)]
                                           for n, _ in ex.topo.mesh}
        assert set(m["components"]) == {d.key for d in ex.decls}
        for d in ex.decls:
            c = m["components"][d.key]
            files = decl_files(d, ex.topo)
            assert c["sharing_pattern"] == d.pattern and c["group_name"] == d.group
            assert c["pattern"] == d.record()
            assert c["ranks"] == sorted(w for _, _, w in files)
            assert c["replicated_across"] == [list(s) for _, s, _ in files]
            assert c["required"] is d.required
            assert c["validation"] == (d.level if d.validated(ex.save_validate) else None)
            assert [(f["path"], f["ranks"], f["writer"]) for f in c["files"]] == [(p, list(s), w) for p, s, w in files]
            for f in c["files"]:
                full = os.path.join(path, f["path"])
                assert f["size_bytes"] == os.path.getsize(full)
                assert f["checksum"] == exact.checksum_of_file(full)
                with open(full, "rb") as fh:
                    data = fh.read()
                with safetensors.safe_open(full, framework="pt") as st_file:  # a standard safetensors file
                    assert "distckpt.skeleton" in (st_file.metadata() or {})
                # The file holds its writer's state (for GLOBAL: rank 0's, not anyone else's).
                assert exact.diff(ex.state(d.key, f["writer"]), decode(bytearray(data))) is None
            assert c["size_bytes"] == sum(f["size_bytes"] for f in c["files"])


# ------------------------------------------------------------------ property 3

@given(examples(), st.booleans())
def test_property_3_load_returns_exactly_what_was_saved(ex: Example, with_missing_optional: bool) -> None:
    _events(ex)
    extra = (Decl("not-saved-optional", "replicated", required=False),) if with_missing_optional else ()
    with worlds.scratch() as out:
        path = worlds.ok(worlds.save(ex, out))[0]
        results = worlds.ok(worlds.load(ex, out, extra=extra))
        for rank, (report, states) in enumerate(results):
            assert report.path == path and not report.legacy
            assert set(report.loaded) == {d.key for d in ex.decls}
            assert dict(report.skipped) == ({"not-saved-optional": "optional component not in checkpoint"}
                                            if extra else {})
            for d in ex.decls:
                assert report.files[d.key] == decl_files(d, ex.topo)[decl_set_index(d, ex.topo, rank)][0]
                problem = exact.diff(ex.expected_after_load(d.key, rank), states[d.key])
                assert problem is None, f"rank {rank}, component {d.key!r} ({d.pattern}): {problem}"
            if extra:
                assert states["not-saved-optional"] is None  # never touched


# ------------------------------------------------------------------ property 4

def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, leaf) of every leaf, containers included as their own entries."""
    out = [(prefix, obj)]
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``obj`` with the entry at ``path`` replaced (tuples rebuilt, the rest in place)."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    new_child = _set(obj[head], rest, value)
    if type(obj) is tuple:
        return tuple(new_child if i == head else v for i, v in enumerate(obj))
    obj[head] = new_child
    return obj


def _dotted(path: tuple[Any, ...]) -> str:
    """The entry name validation reports for ``path`` (distckpt's documented naming of keys)."""
    return ".".join(entry_name(k) for k in path)


def _flip_one_element(t: torch.Tensor, flat_index: int, xor: int) -> None:
    """Change one visible element of ``t`` in place, through its storage (aliases see it too)."""
    base = t._base if t._base is not None else t
    offset = t.storage_offset()
    rest = flat_index
    for size, stride in reversed(list(zip(t.shape, t.stride(), strict=True))):
        offset += (rest % size) * stride
        rest //= size
    raw = base.reshape(-1).view(torch.uint8)
    at = offset * t.element_size()
    if t.dtype is torch.bool:
        raw[at] = 1 - int(raw[at])
    else:
        raw[at] ^= xor


ELEMENT_MODES = ("tensor", "full")
STRUCTURE_MODES = ("dtype", "shape", "add-key", "drop-key", "list-to-tuple", "key-type", "leaf-type")


@st.composite
def mismatch_cases(draw: st.DrawFn, pattern: str) -> tuple[Example, str, int, str, Any]:
    """An example, the validated component of ``pattern``, the rank to change, the level and the change."""
    ex = draw(examples(min_world=2))
    target = next(d for d in ex.decls if d.pattern == pattern)
    group = target.group
    if pattern == "per_group":  # a mesh dimension whose groups have at least two members
        group = draw(st.sampled_from([n for n, size in ex.topo.mesh if size >= 2]))
    elif pattern == "per_node":
        assume(ex.topo.procs_per_node >= 2)
    structural = draw(st.booleans())
    level = draw(st.sampled_from(("quick", "tensor", "full") if structural else ELEMENT_MODES))
    ex = ex.with_decl(Decl(target.key, target.pattern, group, True, level, target.required))
    members = draw(st.sampled_from(decl_sets(ex.decl(target.key), ex.topo)))
    rank = draw(st.sampled_from(members))
    state = ex.state(target.key, rank)
    entries = _paths(state)
    if structural:
        options = ["dtype", "shape", "add-key", "drop-key"]
        if any(type(v) is list for _, v in entries):
            options.append("list-to-tuple")
        if any(type(v) in (dict, OrderedDict) and any(type(k) is int and str(k) not in v for k in v) for _, v in entries):
            options.append("key-type")
        if any(type(v) is int for _, v in entries):
            options.append("leaf-type")
        change = (draw(st.sampled_from(options)), draw(st.integers(0, 2**16)))
    else:
        leaves = [p for p, v in entries if (isinstance(v, torch.Tensor) and v.numel() > 0)
                  or type(v) in (int, str, bytes) or (type(v) is float and v == v)]
        path = draw(st.sampled_from(leaves))
        leaf = _get(state, path)
        index = draw(st.integers(0, leaf.numel() - 1)) if isinstance(leaf, torch.Tensor) else 0
        change = ("element", path, index, draw(st.integers(1, 255)))
    return ex, target.key, rank, level, change


def _apply(state: dict[Any, Any], change: Any) -> tuple[dict[Any, Any], str | None]:
    """Apply a drawn change to one rank's state; returns the state and the entry path that must be named."""
    kind = change[0]
    entries = _paths(state)
    pick = change[-1] if kind != "element" else 0
    if kind == "element":
        _, path, index, xor = change
        leaf = _get(state, path)
        if isinstance(leaf, torch.Tensor):
            _flip_one_element(leaf, index, xor)
        elif type(leaf) is int:
            state = _set(state, path, leaf + 1)
        elif type(leaf) is float:
            state = _set(state, path, leaf + 1.0 if abs(leaf) < 1e15 else -leaf if leaf else 1.0)
        elif type(leaf) is str:
            state = _set(state, path, leaf + "!")
        else:
            state = _set(state, path, leaf + b"!")
        return state, _dotted(path)
    if kind in ("dtype", "shape"):
        tensors = [(p, v) for p, v in entries if isinstance(v, torch.Tensor)]
        path, t = tensors[pick % len(tensors)]
        if kind == "dtype":
            other = torch.int32 if t.dtype is not torch.int32 else torch.int16
            new = torch.zeros(t.shape, dtype=other)
        else:
            new = t.unsqueeze(0)
        return _set(state, path, new), None
    if kind == "add-key":
        state["~extra"] = 0
        return state, None
    if kind == "drop-key":
        del state["~anchor"]
        return state, None
    if kind == "list-to-tuple":
        lists = [p for p, v in entries if type(v) is list]
        path = lists[pick % len(lists)]
        return _set(state, path, tuple(_get(state, path))), None
    if kind == "key-type":
        dicts = [p for p, v in entries if type(v) in (dict, OrderedDict)
                 and any(type(k) is int and str(k) not in v for k in v)]
        path = dicts[pick % len(dicts)]
        d = _get(state, path)
        k = next(k for k in d if type(k) is int and str(k) not in d)
        renamed = type(d)((str(key) if key == k and type(key) is int else key, v) for key, v in d.items())
        return _set(state, path, renamed), None
    ints = [p for p, v in entries if type(v) is int]
    path = ints[pick % len(ints)]
    return _set(state, path, float(_get(state, path))), None


@pytest.mark.parametrize("pattern", ["replicated", "per_node", "per_group"])
@given(data=st.data())
def test_property_4_a_single_change_on_one_replica_fails_every_rank_the_same_way_and_commits_nothing(
    pattern: str, data: st.DataObject,
) -> None:
    ex, key, victim, level, change = data.draw(mismatch_cases(pattern))
    decl = ex.decl(key)
    members = next(s for s in decl_sets(decl, ex.topo) if victim in s)
    event(f"{level}: {change[0]}")
    event(f"replica set of {len(members)}")
    note(f"component {key!r} ({decl.pattern}), rank {victim} of {members}, level {level}, change {change}")
    named: dict[str, str | None] = {}

    def states(rank: int) -> dict[str, Any]:
        mine = {d.key: ex.state(d.key, rank) for d in ex.decls}
        if rank == victim:
            mine[key], named["entry"] = _apply(mine[key], change)
        return mine

    with worlds.scratch() as out:
        results = worlds.save(ex, out, states=states)
        assert all(isinstance(r, ReplicationMismatchError) for r in results), results
        assert len({str(r) for r in results}) == 1 and all(r.failures == results[0].failures for r in results)
        assert all(r.phase == "validate" for r in results)
        failing = set(results[0].failures)
        assert failing and failing <= set(members)
        if len(members) >= 3:
            assert failing == {victim}
        text = str(results[0])
        assert repr(key) in text and str(victim) in text
        if named.get("entry"):
            assert named["entry"] in text
        assert worlds.checkpoints_listing(out) == []  # nothing committed, no staging left


# ------------------------------------------------------------------ property 5

class InjectedFault(RuntimeError):
    """Raised by a phase hook; not a distckpt error, so every rank raises CrossRankError."""


FAULTS = {
    "runtime": (lambda msg: InjectedFault(msg), CrossRankError, "InjectedFault: "),
    "enospc": (lambda msg: OSError(errno.ENOSPC, msg), CrossRankError, "OSError: [Errno 28] "),
    "integrity": (lambda msg: IntegrityError(msg), IntegrityError, "IntegrityError: "),
}


@st.composite
def fault_cases(draw: st.DrawFn, phase: str) -> tuple[Example, str, int, str]:
    ex = draw(examples())
    if phase == "validate" and not any(d.validated(ex.save_validate) for d in ex.decls):
        d = next(d for d in ex.decls if d.pattern == "replicated")
        ex = ex.with_decl(Decl(d.key, d.pattern, d.group, True, "tensor", d.required))
    return ex, phase, draw(st.integers(0, ex.topo.world_size - 1)), draw(st.sampled_from(sorted(FAULTS)))


@pytest.mark.parametrize("phase", ["plan", "validate", "write", "commit"])
@settings(max_examples=min(50, settings().max_examples))  # x 4 phases; each example saves twice and loads
@given(data=st.data())
def test_property_5_an_exception_in_any_phase_on_any_rank_fails_every_rank_naming_it_and_keeps_the_previous_checkpoint(
    phase: str, data: st.DataObject,
) -> None:
    ex, phase, victim, kind = data.draw(fault_cases(phase))
    _events(ex)
    make, expected_class, prefix = FAULTS[kind]
    event(f"phase {phase}" + (" (async)" if ex.async_save and phase in ("write", "commit") else ""))
    event(f"fault {kind}")
    message = f"injected {kind} in {phase} on rank {victim}"
    seen: list[tuple[str, int]] = []

    def hook(p: str, rank: int) -> None:
        seen.append((p, rank))
        if p == phase and rank == victim:
            raise make(message)

    with worlds.scratch() as out:
        previous = worlds.ok(worlds.save(ex, out, generation=0))[0]
        results = worlds.save(ex, out, generation=1, hook=hook)
        assert (phase, victim) in seen
        assert all(type(r) is expected_class for r in results), results
        assert all(r.failures == {victim: prefix + message} for r in results), [r.failures for r in results]
        assert len({str(r) for r in results}) == 1
        assert worlds.checkpoints_listing(out) == [os.path.basename(previous)]
        assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == previous
        for rank, (report, states) in enumerate(worlds.ok(worlds.load(ex, out))):
            assert report.path == previous
            for d in ex.decls:
                assert exact.diff(ex.expected_after_load(d.key, rank, generation=0), states[d.key]) is None


# ------------------------------------------------------------------ property 6

@given(st.lists(st.one_of(valid_names(), hostile_names, st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", fullmatch=True)),
                min_size=1, max_size=6),
       st.one_of(valid_names(), hostile_names), topologies(max_nodes=2, max_procs=2))
def test_property_6_safe_keys_map_injectively_inside_the_checkpoint_and_unsafe_keys_never_touch_the_disk(
    keys: list[str], group: str, topo: Any,
) -> None:
    accepted: dict[str, str] = {}
    with worlds.scratch() as out:
        for key in keys:
            try:
                StateComponent(key, Box({"k": key}), "per_rank")
            except ValueError as exc:
                event("key rejected")
                assert not is_safe_name(key), f"{key!r} is safe but was rejected: {exc}"
                assert "key" in str(exc)
            else:
                event("key accepted")
                assert is_safe_name(key), f"{key!r} is unsafe but was accepted"
                accepted.setdefault(key.casefold(), key)
        try:
            StateComponent("grouped", Box({}), "per_group", process_group_name=group)
            group_ok = True
        except ValueError:
            group_ok = False
        assert group_ok == is_safe_name(group), group
        assert os.listdir(out) == []  # declarations never touch the disk

        if len(set(keys)) != len({k.casefold() for k in keys}) and all(is_safe_name(k) for k in keys):
            with pytest.raises(ValueError, match="collide"):  # case twins
                CheckpointCoordinator([StateComponent(k, Box({}), "global") for k in keys], output_dir=out)
            assert os.listdir(out) == []

        if not accepted:
            return
        gname = group if group_ok else "g"
        mesh = ((gname, topo.world_size),)
        topo = type(topo)(topo.nodes, topo.procs_per_node, topo.node_of, mesh)
        decls = tuple(Decl(k, p, gname if p == "per_group" else None) for k, p in zip(accepted.values(), PATTERNS * 2, strict=False))
        ex = Example(topo, decls, {k: {"v": torch.tensor([i])} for i, k in enumerate(accepted.values())})
        path = worlds.ok(worlds.save(ex, out, async_save=False))[0]
        root = os.path.realpath(path)
        owner: dict[str, str] = {}
        for d in ex.decls:
            for rel, _, _ in decl_files(d, topo):
                full = os.path.realpath(os.path.join(path, rel))
                assert os.path.commonpath([root, full]) == root and os.path.isfile(full)
                assert full.casefold() not in owner, f"{d.key!r} and {owner[full.casefold()]!r} share {rel}"
                owner[full.casefold()] = d.key
        assert oracle.checkpoint_files(path) == {"manifest.json"} | {
            rel for d in ex.decls for rel, _, _ in decl_files(d, topo)}
        assert sorted(os.listdir(os.path.join(out))) == ["checkpoints"]


# ------------------------------------------------------- bugs the suite found

# Found by this suite; fixed in 7b3d7de. Kept as a regression test.
@pytest.mark.parametrize("twin", ["int-and-str", "dotted", "empty-key"])
@pytest.mark.timeout(60)
def test_a_divergence_behind_colliding_entry_paths_is_still_caught_by_tensor_validation(twin: str) -> None:
    topo = Topo(1, 2, (0, 0), (("dp", 2),))
    ex = Example(topo, (Decl("model", "replicated", validate=True, level="tensor"),), bases={})

    def states(rank: int) -> dict[str, Any]:
        hidden = torch.full((2,), float(rank))  # differs between the two replicas
        if twin == "int-and-str":
            return {"model": {"layers": {1: hidden, "1": torch.ones(2)}}}
        if twin == "empty-key":  # {"": {"b": x}} and {"b": y} are both entry "b"
            return {"model": {"": {"b": hidden}, "b": torch.ones(2)}}
        return {"model": {"a.b": hidden, "a": {"b": torch.ones(2)}}}

    with worlds.scratch() as out:
        results = worlds.save(ex, out, states=states, async_save=False)
        assert all(isinstance(r, ReplicationMismatchError) for r in results), results


# Found by this suite; fixed in 7b3d7de. Kept as a regression test.
@pytest.mark.timeout(60)
def test_a_negative_nan_python_float_round_trips_bit_exact() -> None:
    import struct

    from distckpt.codec import encode

    value = -float("nan")
    back = decode(bytearray(encode({"x": value}).to_bytes()))["x"]
    assert struct.pack("<d", back) == struct.pack("<d", value)


def test_the_strategies_cover_every_dtype_view_and_leaf_kind() -> None:
    """A guard on the generators themselves: what the properties claim to cover is generated."""
    from hypothesis import Phase, settings
    from hypothesis import find as _find

    def find(strategy: Any, condition: Any) -> Any:  # no shrinking: existence is all we ask
        return _find(strategy, condition, settings=settings(phases=[Phase.generate], database=None, max_examples=5000))

    from tests.property.strategies import TENSOR_DTYPES, state_dicts, tensors

    for dtype in TENSOR_DTYPES:
        find(tensors(), lambda t, dt=dtype: t.dtype == dt and t.numel() > 0)
    find(tensors(), lambda t: not t.is_contiguous())
    find(tensors(), lambda t: t.dim() == 0)
    find(tensors(), lambda t: 0 in t.shape)
    find(tensors(), lambda t: t.is_conj())
    find(tensors(), lambda t: t.dtype.is_floating_point and bool(torch.isnan(t.float()).any()))
    find(tensors(), lambda t: t.numel() == 1 and t.dim() == 1 and t.stride() != (1,))

    def keys(d: Any) -> list[Any]:
        return [k for p, v in _paths(d) if type(v) in (dict, OrderedDict) for k in v]

    find(state_dicts(), lambda d: "" in keys(d))
    find(state_dicts(), lambda d: any(type(k) is str and "." in k for k in keys(d)))
    find(state_dicts(), lambda d: any(type(v) in (dict, OrderedDict) and 1 in v and "1" in v for _, v in _paths(d)))
    find(state_dicts(), lambda d: any(type(v) is float and v != v and math.copysign(1, v) < 0 for _, v in _paths(d)))
    find(state_dicts(), lambda d: any(k.startswith("~alias") for k in d if type(k) is str))


# Found by this suite (aliases of raw-stored dtypes decoded as flat uint8); fixed in a4b9307.
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex32], ids=str)
@pytest.mark.timeout(60)
def test_an_aliased_tensor_of_a_raw_stored_dtype_round_trips_with_its_dtype_and_shape(dtype: torch.dtype) -> None:
    from distckpt.codec import encode

    t = torch.zeros((2, 2), dtype=dtype)
    back = decode(bytearray(encode({"param": t, "same_param": t}).to_bytes()))
    assert back["same_param"].dtype == dtype and back["same_param"].shape == (2, 2)


# Found by this suite; fixed in 7b3d7de. Kept as a regression test.
@pytest.mark.parametrize("make", [lambda: torch.arange(2.0)[::2], lambda: torch.tensor(3.0).expand(1)],
                         ids=["strided-slice", "expanded-scalar"])
@pytest.mark.timeout(60)
def test_a_one_element_strided_view_saves_validates_and_loads(make: Any) -> None:
    topo = Topo(1, 2, (0, 0), (("dp", 2),))
    ex = Example(topo, (Decl("model", "replicated", validate=True, level="tensor"),), bases={})
    with worlds.scratch() as out:
        results = worlds.save(ex, out, states=lambda rank: {"model": {"w": make()}}, async_save=False)
        assert not any(isinstance(r, BaseException) for r in results), results


# Found by this suite; fixed in 7b3d7de. Kept as a regression test.
@pytest.mark.timeout(60)
def test_a_key_with_a_lone_surrogate_validates_as_it_saves() -> None:
    topo = Topo(1, 2, (0, 0), (("dp", 2),))
    ex = Example(topo, (Decl("model", "replicated", validate=True, level="tensor"),), bases={})
    with worlds.scratch() as out:
        results = worlds.save(ex, out, states=lambda rank: {"model": {"\ud800": torch.ones(1)}}, async_save=False)
        assert not any(isinstance(r, BaseException) for r in results), results


@pytest.mark.timeout(60)
def test_empty_dotted_twin_and_surrogate_keys_round_trip_bit_exact() -> None:
    """The key shapes that once broke validation, spelled out (the strategies draw them too)."""
    topo = Topo(1, 2, (0, 0), (("dp", 2),))
    base = {"": {"b": torch.ones(2)}, "b": torch.zeros(2), "\ud800": "\udcff", 1: 1.5, "1.x": [b""]}
    ex = Example(topo, (Decl("model", "replicated"),), bases={"model": base})
    with worlds.scratch() as out:
        worlds.ok(worlds.save(ex, out, async_save=False))
        for rank, (_, states) in enumerate(worlds.ok(worlds.load(ex, out))):
            assert exact.diff(ex.expected_after_load("model", rank), states["model"]) is None


_COMPLEX128_LOAD = r"""
import sys, tempfile, torch
from distckpt import CheckpointCoordinator, StateComponent

class Holder:
    def __init__(self, module, note):
        self.module, self.note = module, note
    def state_dict(self):
        return {**self.module.state_dict(), "note": self.note}
    def load_state_dict(self, state):
        self.module.load_state_dict(state, strict=False)  # Parameter.copy_ from the loaded tensors

class Phase(torch.nn.Module):  # a complex scalar gain and a complex bias, as in a phase-aware layer
    def __init__(self, value):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(value, dtype=torch.complex128))
        self.bias = torch.nn.Parameter(torch.full((2,), value, dtype=torch.complex128))

for i in range(8):  # notes of growing length move the data offset through both 8-byte phases
    out = tempfile.mkdtemp()
    src = Holder(Phase(0.5 + 1j), "x" * (8 * i))
    CheckpointCoordinator([StateComponent("model", src, "global")], output_dir=out).save_checkpoint()
    dst = Holder(Phase(0j), "")
    CheckpointCoordinator([StateComponent("model", dst, "global")], output_dir=out).load_checkpoint()
    assert torch.equal(dst.module.gain, src.module.gain) and torch.equal(dst.module.bias, src.module.bias)
    print("loaded", i, flush=True)
"""


@pytest.mark.timeout(120)
def test_a_loaded_complex128_parameter_can_be_copied_into_a_module() -> None:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _COMPLEX128_LOAD], capture_output=True, text=True, timeout=100)
    assert run.returncode == 0, f"exit {run.returncode}; stdout {run.stdout[-300:]!r}; stderr {run.stderr[-600:]!r}"
