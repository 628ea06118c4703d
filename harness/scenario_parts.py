"""Parsing the sections of a scenario file: topology, components, faults, run, expect, options.

Who uses it: :func:`harness.scenario.parse_scenario` only. Each function reads
one TOML table through a :class:`~harness._reader.TableReader` and returns a
frozen object of :mod:`harness.scenario_model`; every error is a
:class:`~harness._reader.ScenarioError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from distckpt.coordinator import LOAD_STRATEGIES
from harness._reader import TableReader, suggest
from harness.scenario_model import (
    ERROR_CLASSES,
    FAULT_KINDS,
    LEVELS,
    MAX_WORLD,
    PATTERNS,
    PHASES,
    SAVE_MODES,
    TRAINERS,
    ComponentSpec,
    Expectation,
    FaultSpec,
    RunSpec,
    Topology,
)

__all__ = [
    "NAME",
    "OPTIONS",
    "parse_component",
    "parse_expect",
    "parse_fault",
    "parse_imports",
    "parse_options",
    "parse_run",
    "parse_topology",
]

T = TypeVar("T")
#: Names of scenarios, components and mesh dimensions.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def parse_topology(
    r: TableReader, trainer: str, fallback: Topology | None = None, *, finish: bool = True
) -> Topology:
    """``[topology]`` (or ``[resume]``, whose missing fields fall back to the saving world's).

    ``procs_per_node`` is one size for every node or a list with each node's
    size (``[3, 2, 1]``); ``nodes`` then defaults to the list's length.
    """
    info = TRAINERS[trainer]
    given = r.get("procs_per_node", (int, list), None, what="a positive integer or a list of them")
    if given is None and fallback is None:
        raise r.error("procs_per_node", "is required")
    if isinstance(given, list):  # one size per node
        sizes = _node_sizes(r, given)
        nodes = r.integer("nodes", len(sizes), minimum=1)
        if nodes != len(sizes):
            raise r.error("nodes", f"is {nodes} but procs_per_node lists {len(sizes)} node sizes")
    elif given is not None:
        sizes = _node_sizes(r, given)
        nodes = r.integer("nodes", fallback.nodes if fallback else 1, minimum=1)
        sizes = sizes * nodes
    else:  # the resuming world keeps the saving world's node sizes
        assert fallback is not None
        nodes = r.integer("nodes", fallback.nodes, minimum=1)
        if nodes != fallback.nodes and fallback.uneven:
            raise r.error("procs_per_node", "the saving world's nodes are uneven; give the resuming world's sizes")
        sizes = fallback.node_sizes if nodes == fallback.nodes else (fallback.node_sizes[0],) * nodes
    uneven = len(set(sizes)) > 1
    ppn: int | tuple[int, ...] = sizes if uneven else sizes[0]
    world = sum(sizes)
    shape = f"nodes of {list(sizes)}" if uneven else f"{nodes} x {sizes[0]}"
    mesh_table = r.sub("mesh", None)
    mesh: tuple[tuple[str, int], ...] = ()
    if mesh_table is not None:
        dims: list[tuple[str, int]] = []
        for name in list(mesh_table.table):
            size = mesh_table.integer(name, minimum=1)
            if not NAME.fullmatch(name):
                raise mesh_table.error(name, "is not a valid group name")
            dims.append((name, size))
        mesh_table.finish()
        mesh = tuple(dims)
    elif fallback is not None and fallback.mesh:
        mesh = _rescale_mesh(r, fallback.mesh, world)
    if tuple(n for n, _ in mesh) != info.mesh_dims:
        want = " x ".join(info.mesh_dims) if info.mesh_dims else "no mesh"
        raise r.error("mesh", f"trainer {trainer!r} needs {want}; got {dict(mesh) or 'none'}")
    if mesh and math.prod(s for _, s in mesh) != world:
        raise r.error(
            "mesh",
            f"sizes {dict(mesh)} multiply to {math.prod(s for _, s in mesh)}, "
            f"not the world size {world} ({shape})",
        )
    if world > MAX_WORLD:
        raise r.error("procs_per_node", f"worlds have at most {MAX_WORLD} ranks; this one has {world}")
    if not info.min_world <= world <= info.max_world:
        raise r.error(
            "procs_per_node",
            f"trainer {trainer!r} runs on {info.min_world} to "
            f"{info.max_world} ranks; this world has {world}",
        )
    if nodes < info.min_nodes:
        raise r.error("nodes", f"trainer {trainer!r} needs at least {info.min_nodes} nodes")
    if finish:
        r.finish()
    return Topology(nodes=nodes, procs_per_node=ppn, mesh=mesh)


def _node_sizes(r: TableReader, given: int | list[Any]) -> tuple[int, ...]:
    items = [given] if isinstance(given, int) else given
    if not items:
        raise r.error("procs_per_node", "give at least one node size")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise r.error("procs_per_node", f"node sizes must be positive integers, got {item!r}")
    return tuple(items)


def _rescale_mesh(
    r: TableReader, mesh: tuple[tuple[str, int], ...], world: int
) -> tuple[tuple[str, int], ...]:
    if math.prod(s for _, s in mesh) == world:
        return mesh
    raise r.error("mesh", f"the world size changed to {world}; give the resuming world's mesh")


def parse_component(r: TableReader, key: str, topology: Topology) -> ComponentSpec:
    from distckpt.patterns import registered_patterns

    registry = registered_patterns()
    raw_kind = r.get("pattern", str)
    pattern = raw_kind.lower()
    if pattern not in registry:
        raise r.error(
            "pattern",
            f"{raw_kind!r} is not a registered sharing pattern (registered: "
            f"{', '.join(sorted(registry))}); a pattern of your own must be registered by a "
            "module named in the top-level imports",
        )
    group = _parse_group(r, pattern, topology)
    params = _parse_params(r, pattern, group)
    if pattern == "per_group" and group is None:  # given as params.groups: check them the same way
        names = params["groups"]
        unknown = [n for n in names if n not in topology.mesh_sizes]
        if unknown:
            dims = ", ".join(topology.mesh_sizes) or "none"
            raise r.error("params", f"groups {unknown} are not mesh dimensions (mesh dimensions: {dims})")
        group = names[0] if len(names) == 1 else tuple(names)
    validate = r.get("validate", bool, False)
    if validate and not registry[pattern].identical_replicas:
        raise r.error("validate", f"pattern {pattern} has no replicas to validate")
    level = r.choice("level", LEVELS, "tensor")
    required = r.get("required", bool, True)
    r.finish()
    return ComponentSpec(
        key=key, pattern=pattern, group=group, validate=validate, level=level, required=required,
        params=params,
    )


def _parse_group(r: TableReader, pattern: str, topology: Topology) -> str | tuple[str, ...] | None:
    """``group``: a mesh dimension, or a list of them (the join); only for ``per_group``."""
    group = r.get("group", (str, list), None, what="a mesh dimension name or a list of them")
    if group is None:
        return None
    if pattern != "per_group":
        raise r.error("group", f"only pattern per_group takes a group; this one is {pattern}")
    names = [group] if isinstance(group, str) else group
    if not names:
        raise r.error("group", "name at least one mesh dimension")
    dims = ", ".join(topology.mesh_sizes) or "none"
    for name in names:
        if not isinstance(name, str):
            raise r.error("group", f"expected mesh dimension names, got {name!r}")
        if name not in topology.mesh_sizes:
            raise r.error("group", f"{name!r} is not a mesh dimension (mesh dimensions: {dims})")
    if len(set(names)) != len(names):
        raise r.error("group", f"names repeat: {names}")
    return group if isinstance(group, str) else tuple(names)


def _parse_params(r: TableReader, pattern: str, group: str | tuple[str, ...] | None) -> dict[str, Any]:
    """``params``: the pattern's parameters; checked by building the pattern object."""
    from harness.patterns import build_pattern

    params = r.get("params", dict, None, what="a table")
    if params is not None and group is not None:
        raise r.error("params", "give the groups either as group or as params.groups, not both")
    if params is None and pattern == "per_group" and group is None:
        raise r.error("group", "is required for pattern per_group (or give params.groups)")
    if params is None:
        params = {"groups": [group] if isinstance(group, str) else list(group)} if group else {}
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise r.error("params", f"must be plain JSON values: {exc}") from None
    field_name = "params" if "params" in r.table else ("group" if group is not None else "pattern")
    try:
        built = build_pattern(pattern, params)
    except Exception as exc:  # a user pattern's constructor may raise anything
        raise r.error(field_name, f"pattern {pattern} refuses params {params}: {exc}") from None
    # the built-ins in their recorded form (params.groups = "dp" is ["dp"]); others as given
    return dict(built.params()) if pattern in PATTERNS else dict(params)


def parse_fault(r: TableReader, world: int, keys: set[str]) -> FaultSpec:
    kind = r.choice("kind", FAULT_KINDS)
    ranks = r.ranks("ranks", world)
    if not ranks:
        raise r.error("ranks", "must name at least one rank")
    phase = r.choice("phase", PHASES, None)
    component = r.get("component", str, None)
    if kind in ("raise", "sigkill"):
        if phase is None:
            raise r.error("phase", f"is required for a {kind} fault")
        if component is not None:
            raise r.error("component", f"a {kind} fault acts on a phase, not a component")
    else:
        if component is None:
            raise r.error("component", "is required for a diverge fault")
        if component not in keys:
            raise r.error("component", f"{component!r} is not a declared component")
        if phase is not None:
            raise r.error("phase", "a diverge fault happens before the save, not in a phase")
    r.finish()
    return FaultSpec(kind=kind, ranks=ranks, phase=phase, component=component)


def _per_component(r: TableReader, name: str, keys: set[str], read: Callable[[TableReader, str], T]) -> dict[str, T]:
    """An optional table ``name`` keyed by declared components, each value parsed by ``read``."""
    table = r.sub(name, None)
    out: dict[str, T] = {}
    if table is not None:
        for key in list(table.table):
            if key not in keys:
                raise table.error(key, "is not a declared component")
            out[key] = read(table, key)
        table.finish()
    return out


def parse_expect(r: TableReader | None, world: int, keys: set[str]) -> Expectation:
    if r is None:
        return Expectation()
    outcome = r.choice("outcome", ("success", "error"), "success")
    error = r.get("error", str, None)
    stage = r.choice("stage", ("save", "load"), None)
    failing = r.ranks("failing_ranks", world, None)
    bit_exact = r.get("bit_exact", bool, outcome == "success")
    writers = _per_component(r, "writers", keys, lambda t, key: t.ranks(key, world))
    parts = _per_component(r, "parts", keys, lambda t, key: t.integer(key, minimum=1))
    if outcome == "error":
        if error is None:
            raise r.error("error", "is required when outcome is 'error'")
        if error not in ERROR_CLASSES:
            raise r.error(
                "error",
                f"{error!r} is not a distckpt error; expected one of {', '.join(ERROR_CLASSES)}",
            )
        if stage is None:
            raise r.error("stage", "is required when outcome is 'error' (save or load)")
        if bit_exact:
            raise r.error("bit_exact", "a scenario that expects an error cannot be bit-exact")
    else:
        for name, value in (("error", error), ("stage", stage), ("failing_ranks", failing)):
            if value is not None:
                raise r.error(name, "only applies when outcome is 'error'")
    r.finish()
    return Expectation(
        outcome=outcome,
        error=error,
        stage=stage,
        failing_ranks=failing,
        writers=writers,
        parts=parts,
        bit_exact=bit_exact,
    )


def parse_run(r: TableReader | None) -> RunSpec:
    if r is None:
        return RunSpec()
    d = RunSpec()
    steps = r.integer("steps", d.steps, minimum=1)
    save_at = r.integer("save_at", d.save_at, minimum=1)
    if save_at > steps:
        raise r.error("save_at", f"must be <= steps ({steps}), got {save_at}")
    seed = r.integer("seed", d.seed, minimum=0)
    batch = r.integer("batch_size", d.batch_size, minimum=1)
    validate = r.get("validate", bool, d.validate)
    timeout = r.get("timeout", float, d.timeout)
    world_timeout = r.get("world_timeout", float, d.world_timeout)
    min_part_bytes = r.integer("min_part_bytes", None, minimum=1)
    load_strategy = r.choice("load_strategy", LOAD_STRATEGIES, None)
    save_mode = r.choice("save_mode", SAVE_MODES, d.save_mode)
    direct_io = r.get("direct_io", bool, d.direct_io)
    for name, value in (("timeout", timeout), ("world_timeout", world_timeout)):
        if value <= 0:
            raise r.error(name, f"must be positive, got {value}")
    if world_timeout <= timeout:
        raise r.error(
            "world_timeout",
            f"must exceed timeout ({timeout}) so that the library's own timeout fires first",
        )
    r.finish()
    return RunSpec(
        steps=steps,
        save_at=save_at,
        seed=seed,
        batch_size=batch,
        validate=validate,
        timeout=timeout,
        world_timeout=world_timeout,
        min_part_bytes=min_part_bytes,
        load_strategy=load_strategy,
        save_mode=save_mode,
        direct_io=direct_io,
    )


#: Trainer knobs a scenario may set under ``[options]``, with their types.
OPTIONS: Mapping[str, type] = MappingProxyType(
    {"hidden": int, "samples": int, "microbatches": int, "lr": float, "dropout": float}
)


def parse_options(r: TableReader | None) -> Mapping[str, Any]:
    if r is None:
        return {}
    out: dict[str, Any] = {}
    for key in list(r.table):
        if key not in OPTIONS:
            raise r.error(key, "unknown option" + suggest(key, OPTIONS))
        kind = OPTIONS[key]
        out[key] = r.integer(key, minimum=1) if kind is int else r.get(key, kind)
    if "dropout" in out and not 0.0 <= out["dropout"] < 1.0:
        raise r.error("dropout", f"must be in [0, 1), got {out['dropout']}")
    if "lr" in out and out["lr"] <= 0:
        raise r.error("lr", f"must be positive, got {out['lr']}")
    r.finish()
    return out


def parse_imports(top: TableReader) -> tuple[str, ...]:
    """``imports``: modules that register the scenario's own patterns, imported here and now.

    Relative ``.py`` paths are resolved against the scenario file's directory;
    the result holds absolute paths and dotted names (what the rank processes import).
    """
    from harness.patterns import ImportFailed, load_imports, resolve_import

    entries = top.get("imports", list, [], what="a list of module names or .py paths")
    resolved: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry:
            raise top.error(f"imports[{i}]", f"expected a module name or a .py path, got {entry!r}")
        try:
            target = resolve_import(entry, Path(top.where).parent)
            load_imports([target])
        except ImportFailed as exc:
            raise top.error(f"imports[{i}]", str(exc)) from exc.__cause__
        resolved.append(target)
    return tuple(resolved)
