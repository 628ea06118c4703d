"""Every hypothesis strategy of the property suite (and of the gloo examples).

Examples are drawn here, in the parent process, and only *materialised* on the
ranks: :func:`materialise` turns a drawn base state into the state one rank
holds, deterministically, so a rank never draws anything.

- :func:`topologies`: 1-4 nodes x 1-4 procs per node, nodes as labels that need
  not follow rank order (so "node index ordered by lowest rank" is exercised),
  and a row-major mesh of 1-3 named dimensions whose product is the world size.
- :func:`declarations`: one component of *every* pattern (PER_GROUP over a
  random mesh dimension) plus random extras; random valid keys unique ignoring
  case; validation on or off at every level; required or optional.
- :func:`state_dicts`: nested dicts (str and int keys, OrderedDict too), lists,
  tuples, tensors of every dtype (bf16, fp16, fp32, fp64, fp8, int8..int64,
  uint8..uint64, bool, complex32/64/128), 0-d and empty shapes, non-contiguous
  views (transposed, strided, expanded, conjugated), aliased tensors, inf/nan/-0.0,
  strings, bytes, NumPy arrays and scalars, torch dtypes and sizes.
- :func:`examples`: all of the above together.

Content is consistent with the pattern: :func:`variant_of` gives the variant a
rank holds (identical within a replica set, different across sets) and
:func:`vary` perturbs every value of a base state by the variant while keeping
its structure and its aliasing.
"""

from __future__ import annotations

import math
import string
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from distckpt.testing.declare import Declaration
from harness import oracle

warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

PATTERNS = oracle.BUILTIN_KINDS
LEVELS = ("none", "quick", "tensor", "full")
NAME_REGEX = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"

TENSOR_DTYPES: tuple[torch.dtype, ...] = (
    torch.bfloat16, torch.float16, torch.float32, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool, torch.complex32, torch.complex64, torch.complex128,
)
NUMPY_DTYPES = ("<i4", ">i8", "<u2", "<f2", ">f4", "<f8", "<c8", "|b1", "|u1", "|i1", "<U3", "|S2",
                "<M8[D]", "<m8[s]")
SPECIAL_FLOATS = (math.inf, -math.inf, math.nan, -0.0)


# ---------------------------------------------------------------- topologies

@dataclass(frozen=True)
class Topo:
    """A world: ``node_of[r]`` is rank r's node label; ``mesh`` a row-major mesh over ranks."""

    nodes: int
    procs_per_node: int
    node_of: tuple[int, ...]
    mesh: tuple[tuple[str, int], ...]

    @property
    def world_size(self) -> int:
        return len(self.node_of)

    @property
    def contiguous(self) -> bool:
        """Ranks numbered node by node with node labels in order (what torchrun gives)."""
        return self.node_of == tuple(r // self.procs_per_node for r in range(self.world_size))

    @property
    def world(self) -> oracle.World:
        """This topology as the oracle's plain data: nodes by label, one partition per mesh dim."""
        by_label: dict[int, list[int]] = {}
        for rank, label in enumerate(self.node_of):
            by_label.setdefault(label, []).append(rank)
        return oracle.World.of(by_label.values(), {n: oracle.mesh_partition(self.mesh, n) for n, _ in self.mesh})

    def groups_of(self, rank: int) -> dict[str, tuple[int, ...]]:
        """``process_groups`` for a threaded world: each mesh dim's group holding ``rank``."""
        return {name: next(g for g in oracle.mesh_partition(self.mesh, name) if rank in g) for name, _ in self.mesh}


def valid_names(max_size: int = 12) -> st.SearchStrategy[str]:
    """Keys and group names that the library must accept (DESIGN.md §3)."""
    head = st.sampled_from(string.ascii_letters + string.digits)
    tail = st.text(alphabet=string.ascii_letters + string.digits + "._-", max_size=max_size - 1)
    return st.builds(lambda h, t: h + t, head, tail)


def long_valid_names() -> st.SearchStrategy[str]:
    """Valid names up to the 128-character limit (any of them)."""
    return st.one_of(valid_names(), st.from_regex(NAME_REGEX, fullmatch=True))


def _factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    if parts == 1:
        return [(n,)]
    out = []
    for d in range(1, n + 1):
        if n % d == 0:
            out += [(d, *rest) for rest in _factorisations(n // d, parts - 1)]
    return out


@st.composite
def meshes(draw: st.DrawFn, world_size: int) -> tuple[tuple[str, int], ...]:
    ndims = draw(st.integers(1, 3))
    sizes = draw(st.sampled_from(_factorisations(world_size, ndims)))
    names = draw(st.lists(st.one_of(st.sampled_from(["dp", "tp", "pp", "cp", "ep"]), valid_names(8)),
                          min_size=ndims, max_size=ndims, unique_by=str.casefold))
    return tuple(zip(names, sizes, strict=True))


@st.composite
def topologies(draw: st.DrawFn, max_nodes: int = 4, max_procs: int = 4, min_world: int = 1,
               contiguous: bool = False) -> Topo:
    """1..max_nodes x 1..max_procs; ``contiguous`` for real worlds (torchrun numbering)."""
    nodes = draw(st.integers(1, max_nodes))
    procs = draw(st.integers(max(1, -(-min_world // nodes)), max_procs))
    world = nodes * procs
    slots = [r // procs for r in range(world)]
    if not contiguous:
        arrangement = draw(st.sampled_from(["contiguous", "relabelled", "interleaved", "shuffled"]))
        if arrangement == "relabelled":
            labels = draw(st.permutations(range(nodes)))
            slots = [labels[s] for s in slots]
        elif arrangement == "interleaved":
            slots = [r % nodes for r in range(world)]
        elif arrangement == "shuffled":
            slots = list(draw(st.permutations(slots)))
    return Topo(nodes, procs, tuple(slots), draw(meshes(world)))


# -------------------------------------------------------------- declarations

#: The tests' declarations are the testing package's (one dataclass for harness and tests).
Decl = Declaration


def decl_sets(decl: Declaration, topo: Topo) -> tuple[tuple[int, ...], ...]:
    """Replica sets of ``decl`` in ``topo``, from ``harness.oracle``."""
    return oracle.replica_sets(topo.world, decl.pattern, decl.params)


def decl_set_index(decl: Declaration, topo: Topo, rank: int) -> int:
    """The index of ``rank``'s replica set."""
    return oracle.set_index_of(decl_sets(decl, topo), rank)


def decl_writer(decl: Declaration, topo: Topo, rank: int) -> int:
    """The rank that writes ``rank``'s replica set (its lowest)."""
    return min(decl_sets(decl, topo)[decl_set_index(decl, topo, rank)])


def decl_files(decl: Declaration, topo: Topo) -> list[tuple[str, tuple[int, ...], int]]:
    """(relative path, replica set, writer) of every file, by lowest rank, from ``harness.oracle``."""
    comp = oracle.expected_component(topo.world, decl.key, decl.pattern, decl.params)
    return [(f.path, f.ranks, f.writer) for f in comp.files]


def decl_variant(decl: Declaration, topo: Topo, rank: int) -> int:
    """Which content a rank holds: equal within a replica set, different across sets.
    GLOBAL: every rank holds its own (only rank 0's is authoritative)."""
    return rank if decl.pattern == "global" else decl_set_index(decl, topo, rank)


@st.composite
def declaration(draw: st.DrawFn, key: str, pattern: str, topo: Topo) -> Decl:
    group = draw(st.sampled_from([n for n, _ in topo.mesh])) if pattern == "per_group" else None
    can = pattern in ("replicated", "per_node", "per_group")
    return Decl(key=key, pattern=pattern, group=group,
                validate=draw(st.booleans()) if can else False,
                level=draw(st.sampled_from(LEVELS)), required=draw(st.booleans()))


@st.composite
def declarations(draw: st.DrawFn, topo: Topo, extra: int = 2) -> tuple[Decl, ...]:
    """Every pattern once (in random order), plus up to ``extra`` more of any pattern."""
    patterns = list(draw(st.permutations(PATTERNS)))
    patterns += draw(st.lists(st.sampled_from(PATTERNS), max_size=extra))
    keys = draw(st.lists(st.one_of(valid_names(), long_valid_names()), min_size=len(patterns),
                         max_size=len(patterns), unique_by=str.casefold))
    return tuple(draw(declaration(k, p, topo)) for k, p in zip(keys, patterns, strict=True))


# ---------------------------------------------------------------- state dicts

def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


shapes = st.one_of(st.just(()), st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple)).filter(
    lambda s: _numel(s) <= 16)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A CPU tensor of any dtype and small shape, possibly a non-contiguous view."""
    dtype = draw(st.sampled_from(TENSOR_DTYPES))
    shape = draw(shapes)
    n = _numel(shape)
    if dtype is torch.bool:
        base = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool).reshape(shape)
    else:
        size = n * torch.empty((), dtype=dtype).element_size()
        raw = draw(st.binary(min_size=size, max_size=size))
        base = torch.frombuffer(bytearray(raw + b"\0"), dtype=torch.uint8)[:size].view(dtype).reshape(shape).clone()
        if n and (dtype.is_floating_point or dtype.is_complex):
            for index, value in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(SPECIAL_FLOATS)),
                                              max_size=3)):
                # Converted as a tensor: torch 2.6 refuses a Python inf for float8_e4m3fn (no inf).
                base.view(-1)[index] = torch.tensor(value, dtype=torch.float64).to(dtype)
    views = ["plain"]
    if base.dim() >= 2:
        views.append("transpose")
    if base.dim() >= 1 and base.shape[0] >= 2:
        views.append("strided")
    if base.dim() >= 1:
        views.append("expand")
    if dtype.is_complex:
        views.append("conj")
    view = draw(st.sampled_from(views))
    if view == "transpose":
        out = base.transpose(0, -1)
    elif view == "strided":
        out = base[::2]
    elif view == "expand":
        out = base.unsqueeze(0).expand(2, *base.shape)
    elif view == "conj":
        out = base.conj()
    else:
        out = base
    return out


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = draw(shapes)
    n = _numel(shape)
    if dtype.kind == "b":
        arr = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=dtype)
    elif dtype.kind == "U":
        arr = np.array(draw(st.lists(st.text(max_size=3), min_size=n, max_size=n)) or [], dtype=dtype)
    elif dtype.kind == "S":
        arr = np.array(draw(st.lists(st.binary(max_size=2), min_size=n, max_size=n)) or [], dtype=dtype)
    else:
        arr = np.frombuffer(draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize)), dtype=dtype)
    arr = arr.reshape(shape).copy()
    if arr.ndim >= 1 and arr.shape[0] >= 2 and draw(st.booleans()):
        arr = arr[::2]  # non-contiguous
    return arr


numpy_scalars = st.one_of(
    st.floats(width=32).map(np.float32), st.floats().map(np.float64),
    st.integers(-(2**31), 2**31 - 1).map(np.int32), st.integers(0, 255).map(np.uint8),
    st.booleans().map(np.bool_), st.complex_numbers(allow_nan=False).map(np.complex128),
)

# Every float: inf, -0.0 and NaNs of both signs and any payload (all must come back bit-exact).
python_floats = st.one_of(st.floats(), st.sampled_from([math.inf, -math.inf, math.nan, -math.nan, -0.0]))

leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), python_floats,
    st.text(max_size=6), st.binary(max_size=6),
    tensors(), tensors(), tensors(), numpy_arrays(), numpy_scalars,
    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]),
    st.lists(st.integers(0, 5), max_size=3).map(torch.Size),
)

# Dict keys: int, and str of any character (empty, dotted, digit strings that spell an int key
# of the same dict, lone surrogates all included) except "~", which the suite reserves.
state_keys = st.one_of(st.integers(-3, 40), st.text(alphabet=st.characters(blacklist_characters="~"), max_size=5),
                       st.sampled_from(["", ".", "a.b", "1", "-1", "0", "\ud800"]))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    dicts = st.dictionaries(state_keys, children, max_size=3)
    return st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        dicts,
        dicts.map(OrderedDict),
    )


@st.composite
def state_dicts(draw: st.DrawFn, max_leaves: int = 8) -> dict[Any, Any]:
    """A state dict: a dict of nested containers and leaves, with some aliased tensors."""
    body = draw(st.dictionaries(state_keys, st.recursive(leaves, _containers, max_leaves=max_leaves), max_size=4))
    found = [t for t in _iter_tensors(body) if t.numel() > 0]
    for i in range(draw(st.integers(0, 2)) if found else 0):
        t = draw(st.sampled_from(found))
        kind = draw(st.sampled_from(["same", "flat", "slice"]))
        if kind == "flat" and t.is_contiguous():
            alias = t.view(-1)
        elif kind == "slice" and t.dim() >= 1:
            alias = t[: max(1, t.shape[0] - 1)]
        else:
            alias = t
        body[f"~alias{i}"] = alias
    return body


def _iter_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _iter_tensors(v)]
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return [t for v in obj for t in _iter_tensors(v)]
    return []


# --------------------------------------------------------- variants per rank

def vary(obj: Any, variant: int, _memo: dict[int, Any] | None = None) -> Any:
    """A fresh copy of ``obj`` whose every value is perturbed by ``variant`` (0: identical).

    Structure, key types, dtypes, shapes, strides and aliasing are kept; an
    ``int64`` anchor makes different variants differ even when nothing else can.
    """
    memo: dict[int, Any] = {} if _memo is None else _memo
    if isinstance(obj, torch.Tensor):
        if id(obj) in memo:
            return memo[id(obj)]
        base = obj._base if obj._base is not None and obj._base.dtype == obj.dtype else obj
        if id(base) not in memo:
            memo[id(base)] = _perturb_tensor(base, variant)
        new_base = memo[id(base)]
        if obj is base:
            out = new_base
        else:
            out = new_base.as_strided(obj.shape, obj.stride(), obj.storage_offset())
            if obj.is_conj():
                out = out.conj()
        memo[id(obj)] = out
        return out
    kind = type(obj)
    if kind is dict or kind is OrderedDict:
        return kind((k, vary(v, variant, memo)) for k, v in obj.items())
    if kind is list:
        return [vary(v, variant, memo) for v in obj]
    if kind is tuple:
        return tuple(vary(v, variant, memo) for v in obj)
    if kind is int:
        return obj + variant
    if kind is float:
        return obj + variant if variant and math.isfinite(obj) and abs(obj) < 1e300 else obj
    if kind is str:
        return f"{obj}~{variant}" if variant else obj
    if kind is bytes:
        return obj + variant.to_bytes(4, "little") if variant else obj
    if isinstance(obj, np.ndarray):
        arr = obj.copy()
        if variant and arr.size and arr.dtype.kind in "iufcmM":
            raw = arr.reshape(-1).view(np.uint8) if arr.flags.c_contiguous else None
            if raw is not None:
                raw[:: arr.dtype.itemsize] += np.uint8(variant % 251 + 1)
        elif variant and arr.size and arr.dtype.kind == "b":
            arr = ~arr if variant % 2 else arr
        if not obj.flags.c_contiguous and arr.ndim >= 1:
            arr = np.repeat(arr, 2, axis=0)[::2]  # keep it a non-contiguous view
        return arr
    return obj  # None, bool, numpy scalars, torch dtypes and sizes


def _perturb_tensor(base: torch.Tensor, variant: int) -> torch.Tensor:
    if base.is_conj():
        base = base.resolve_conj()
    out = base.clone(memory_format=torch.contiguous_format) if base.is_contiguous() else base.contiguous().clone()
    if not variant or out.numel() == 0:
        return out
    if out.dtype is torch.bool:
        return out ^ bool(variant % 2)
    raw = out.reshape(-1).view(torch.uint8)
    raw[:: out.element_size()] += variant % 251 + 1
    return out


def component_state(base: Any, key: str, variant: int) -> dict[Any, Any]:
    """The state a rank holding ``variant`` of component ``key`` has."""
    state = vary(base, variant)
    state["~anchor"] = torch.tensor([variant, len(key)], dtype=torch.int64)
    return state


# ------------------------------------------------------------------ examples

@dataclass(frozen=True)
class Example:
    """One drawn world: topology, declarations, a base state per component, save options."""

    topo: Topo
    decls: tuple[Decl, ...]
    bases: dict[str, Any] = field(compare=False)
    save_validate: bool = False
    async_save: bool = False
    background_staging: bool = False  # (with async_save) the host copy runs after the call returns

    def decl(self, key: str) -> Decl:
        return next(d for d in self.decls if d.key == key)

    def state(self, key: str, rank: int, generation: int = 0) -> dict[Any, Any]:
        """Rank ``rank``'s state of ``key`` for save number ``generation``."""
        return component_state(self.bases[key], key, decl_variant(self.decl(key), self.topo, rank)
                               + 1000 * generation)

    def expected_after_load(self, key: str, rank: int, generation: int = 0) -> dict[Any, Any]:
        """What ``rank`` must hold after loading: the state of its set's writer."""
        writer = decl_writer(self.decl(key), self.topo, rank)
        return self.state(key, writer, generation)

    def with_decl(self, decl: Decl) -> Example:
        return replace(self, decls=tuple(decl if d.key == decl.key else d for d in self.decls))


@st.composite
def examples(draw: st.DrawFn, max_nodes: int = 4, max_procs: int = 4, min_world: int = 1,
             contiguous: bool = False, extra: int = 2, max_leaves: int = 6) -> Example:
    topo = draw(topologies(max_nodes, max_procs, min_world, contiguous))
    decls = draw(declarations(topo, extra))
    bases = {d.key: draw(state_dicts(max_leaves)) for d in decls}
    save_validate, async_save = draw(st.booleans()), draw(st.booleans())
    return Example(topo, decls, bases, save_validate=save_validate, async_save=async_save,
                   background_staging=async_save and draw(st.booleans()))


# ------------------------------------------------------------- key hygiene

#: Strings that are not safe keys (DESIGN.md §3 and the issue's fault catalogue).
hostile_names = st.one_of(
    st.sampled_from(["../x", "a/../../b", "/abs", "", ".", "..", "a\0b", "a\\b", "x" * 129, "-lead",
                     ".hidden", "a b", "é", "a/b", "C:\\x", "~", "a\n"]),
    st.text(max_size=140),
)


def is_safe_name(s: str) -> bool:
    """Independent statement of the rule: 1-128 of [A-Za-z0-9._-], first alnum, never . or .."""
    allowed = set(string.ascii_letters + string.digits + "._-")
    return (isinstance(s, str) and 1 <= len(s) <= 128 and s[0] in string.ascii_letters + string.digits
            and all(c in allowed for c in s) and s not in (".", ".."))


# ------------------------------------------------------ shipping to ranks

@dataclass(frozen=True)
class _ShippedTensor:
    """A tensor as plain bytes: torch cannot unpickle some dtypes (uint16..64) in another process."""

    base: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    conj: bool


@dataclass(frozen=True)
class _ShippedBase:
    dtype: str
    numel: int
    data: bytes


def _pack(obj: Any, bases: list[_ShippedBase], memo: dict[int, int]) -> Any:
    if isinstance(obj, torch.Tensor):
        root = obj._base if obj._base is not None and obj._base.dtype == obj.dtype else obj
        if root.is_conj():
            root = root.resolve_conj()
        if id(root) not in memo:
            storage = root.untyped_storage()
            data = bytes(storage) if storage.nbytes() else b""
            memo[id(root)] = len(bases)
            bases.append(_ShippedBase(str(obj.dtype).removeprefix("torch."), storage.nbytes() // obj.element_size(), data))
        return _ShippedTensor(memo[id(root)], tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.is_conj())
    kind = type(obj)
    if kind is dict or kind is OrderedDict:
        return kind((k, _pack(v, bases, memo)) for k, v in obj.items())
    if kind is list:
        return [_pack(v, bases, memo) for v in obj]
    if kind is tuple:
        return tuple(_pack(v, bases, memo) for v in obj)
    return obj


def _unpack(obj: Any, bases: list[_ShippedBase], made: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, _ShippedTensor):
        if obj.base not in made:
            b = bases[obj.base]
            dtype = getattr(torch, b.dtype)
            raw = torch.frombuffer(bytearray(b.data + b"\0"), dtype=torch.uint8)[: len(b.data)]
            made[obj.base] = raw.view(dtype).clone() if b.numel else torch.empty(0, dtype=dtype)
        out = made[obj.base].as_strided(obj.shape, obj.stride, obj.offset)
        return out.conj() if obj.conj else out
    kind = type(obj)
    if kind is dict or kind is OrderedDict:
        return kind((k, _unpack(v, bases, made)) for k, v in obj.items())
    if kind is list:
        return [_unpack(v, bases, made) for v in obj]
    if kind is tuple:
        return tuple(_unpack(v, bases, made) for v in obj)
    return obj


def ship(ex: Example) -> Example:
    """``ex`` with its base states as plain data that any process can unpickle (see :func:`unship`)."""
    bases: list[_ShippedBase] = []
    packed = _pack(ex.bases, bases, {})
    return replace(ex, bases={"~shipped": (packed, bases)})


def unship(ex: Example) -> Example:
    """The inverse of :func:`ship`, on the rank (aliasing, strides and conjugation kept)."""
    if "~shipped" not in ex.bases:
        return ex
    packed, bases = ex.bases["~shipped"]
    return replace(ex, bases=_unpack(packed, bases, {}))
