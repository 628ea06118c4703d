"""Scenario files: TOML parsed into frozen, validated objects.

A scenario names a trainer, the topology of the world that saves (and, for
elastic or negative scenarios, of the world that resumes), the steps to run and
the step to save at, every component's declaration, optional faults, and what
must happen. Every error names the file and the field at fault. The format is
documented in ``docs/scenarios.md``. A component may name any registered
sharing pattern (``pattern`` plus ``params``); the modules in the top-level
``imports`` are imported while parsing, so that patterns of their own are
registered before the kinds are checked (:mod:`harness.patterns`).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import distckpt.errors as distckpt_errors
from distckpt.coordinator import LOAD_STRATEGIES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ERROR_CLASSES",
    "FAULT_KINDS",
    "PATTERNS",
    "PHASES",
    "TRAINERS",
    "ComponentSpec",
    "Expectation",
    "FaultSpec",
    "RunSpec",
    "Scenario",
    "ScenarioError",
    "Topology",
    "load_scenario",
    "load_scenarios",
    "parse_scenario",
]

T = TypeVar("T")

#: Sharing patterns, by the values distckpt's ``SharingPattern`` uses.
PATTERNS: tuple[str, ...] = ("global", "replicated", "per_rank", "per_node", "per_group")
#: Replication validation levels.
LEVELS: tuple[str, ...] = ("none", "quick", "tensor", "full")
#: Save phases at which a fault can be injected (distckpt's ``phase_hook`` names).
PHASES: tuple[str, ...] = ("plan", "validate", "write", "commit")
#: Fault kinds: raise an exception or SIGKILL in a save phase; diverge a replica before saving.
FAULT_KINDS: tuple[str, ...] = ("raise", "sigkill", "diverge")
#: Error classes a negative scenario may expect (names exported by distckpt).
ERROR_CLASSES: tuple[str, ...] = tuple(
    name for name in distckpt_errors.__all__
    if isinstance(getattr(distckpt_errors, name), type)
)


@dataclass(frozen=True)
class TrainerInfo:
    """What a trainer needs from a topology and which components it offers."""

    mesh_dims: tuple[str, ...]
    components: frozenset[str]
    min_world: int = 1
    max_world: int = 8
    min_nodes: int = 1


_BASE = frozenset({"model", "optimizer", "scheduler", "dataset", "rng"})
#: The trainers in :mod:`harness.trainers`, their mesh dimensions and components.
TRAINERS: Mapping[str, TrainerInfo] = MappingProxyType(
    {
        "single": TrainerInfo((), _BASE, max_world=1),
        "ddp": TrainerInfo((), _BASE),
        "ddp_independent": TrainerInfo((), _BASE),
        "pp": TrainerInfo((), _BASE, min_world=2, max_world=4),
        "dp_pp": TrainerInfo(("dp", "pp"), _BASE, min_world=4),
        "dp_tp": TrainerInfo(("dp", "tp"), _BASE, min_world=4),
        "per_node": TrainerInfo((), _BASE | {"cache"}, min_world=2, min_nodes=2),
        "tp": TrainerInfo(("dp", "tp"), _BASE),
        "fsdp": TrainerInfo(("dp",), _BASE),
        "hsdp": TrainerInfo(("dp", "shard"), _BASE),
        "dp_pp_tp": TrainerInfo(("dp", "pp", "tp"), _BASE),
    }
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class Topology:
    """A world of ``nodes x procs_per_node`` ranks, optionally with a named mesh.

    ``mesh`` lists ``(dimension name, size)`` in row-major order (the last
    dimension varies fastest over consecutive ranks); its sizes multiply to the
    world size.
    """

    nodes: int
    procs_per_node: int
    mesh: tuple[tuple[str, int], ...] = ()

    @property
    def world_size(self) -> int:
        """Total number of ranks."""
        return self.nodes * self.procs_per_node

    @property
    def mesh_sizes(self) -> dict[str, int]:
        """Mesh dimension name -> size."""
        return dict(self.mesh)

    def describe(self) -> str:
        """``2x4`` (nodes x procs per node), with the mesh when there is one."""
        text = f"{self.nodes}x{self.procs_per_node}"
        if self.mesh:
            text += " " + "x".join(f"{n}{s}" for n, s in self.mesh)
        return text


@dataclass(frozen=True)
class ComponentSpec:
    """One component's declaration, as distckpt's ``StateComponent`` takes it.

    ``pattern`` is a registered pattern kind and ``params`` its parameters, as
    the manifest records them (``{"kind": pattern, "params": params}``).
    ``group`` is the built-in ``per_group``'s group name, or a tuple of names
    for the join of several groups; for ``per_group`` the params are derived
    from it (``{"groups": [...]}``) when not given.
    """

    key: str
    pattern: str
    group: str | tuple[str, ...] | None = None
    validate: bool = False
    level: str = "tensor"
    required: bool = True
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pattern == "per_group" and self.group is not None and not self.params:
            names = [self.group] if isinstance(self.group, str) else list(self.group)
            object.__setattr__(self, "params", {"groups": names})

    def record(self) -> dict[str, Any]:
        """``{"kind": ..., "params": {...}}``: the pattern as the manifest records it."""
        return {"kind": self.pattern, "params": dict(self.params)}

    def pattern_object(self) -> Any:
        """The ``distckpt.Pattern`` this declares (its kind must be registered in this process)."""
        from harness.patterns import build_pattern

        return build_pattern(self.pattern, self.params)


@dataclass(frozen=True)
class FaultSpec:
    """A fault injected into the saving world.

    ``raise`` and ``sigkill`` act at the start of save ``phase`` on ``ranks``;
    ``diverge`` perturbs ``component`` on ``ranks`` just before the save.
    """

    kind: str
    ranks: tuple[int, ...]
    phase: str | None = None
    component: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """How long to train, when to save, and the knobs of the run."""

    steps: int = 6
    save_at: int = 3
    seed: int = 1234
    batch_size: int = 8
    validate: bool = False
    timeout: float = 30.0
    world_timeout: float = 120.0
    min_part_bytes: int | None = None  # None: the library's default
    load_strategy: str | None = None  # None: the library's default


@dataclass(frozen=True)
class Expectation:
    """What must happen: success (with writers per component) or an error class at a stage."""

    outcome: str = "success"
    error: str | None = None
    stage: str | None = None
    failing_ranks: tuple[int, ...] | None = None
    writers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    parts: Mapping[str, int] = field(default_factory=dict)
    bit_exact: bool = True

    @property
    def succeeds(self) -> bool:
        """True for a positive scenario."""
        return self.outcome == "success"


@dataclass(frozen=True)
class Scenario:
    """One parsed scenario file."""

    name: str
    path: str
    trainer: str
    topology: Topology
    resume_topology: Topology
    run: RunSpec
    components: tuple[ComponentSpec, ...]
    faults: tuple[FaultSpec, ...] = ()
    expect: Expectation = field(default_factory=Expectation)
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    #: Modules that register the scenario's own patterns: absolute ``.py`` paths or dotted names.
    imports: tuple[str, ...] = ()

    @property
    def elastic(self) -> bool:
        """True when the resuming world differs from the saving world."""
        return self.resume_topology != self.topology

    def component(self, key: str) -> ComponentSpec:
        """The declaration of ``key``."""
        for c in self.components:
            if c.key == key:
                return c
        raise KeyError(key)

    def describe_world(self) -> str:
        """``2x2``, or ``1x4->1x2`` for an elastic scenario."""
        if self.elastic:
            return f"{self.topology.describe()}->{self.resume_topology.describe()}"
        return self.topology.describe()


# ---------------------------------------------------------------- parsing


class _Reader:
    """Typed access to one TOML table with errors naming file and field."""

    def __init__(self, where: str, table: Any, prefix: str = "") -> None:
        self.where = where
        self.prefix = prefix
        if not isinstance(table, dict):
            raise self.error("", f"expected a table, got {type(table).__name__}")
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ScenarioError:
        fld = self.name(key) if key else (self.prefix.rstrip(".") or "<top level>")
        return ScenarioError(f"{self.where}: {fld}: {message}")

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, what: str = ""
    ) -> Any:
        self.used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {what or _kind_names(kinds)}, got a bool")
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {what or _kind_names(kinds)}, got {value!r}")
        return value

    def integer(self, key: str, default: Any = ..., *, minimum: int | None = None) -> Any:
        value = self.get(key, int, default)
        if value is not None and minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def choice(self, key: str, choices: Iterable[str], default: Any = ...) -> Any:
        options = tuple(choices)
        value = self.get(key, str, default)
        if value is None:
            return None
        folded = value.lower()
        if folded not in options:
            raise self.error(key, f"expected one of {', '.join(options)}; got {value!r}")
        return folded

    def ranks(self, key: str, world: int, default: Any = ...) -> Any:
        value = self.get(key, (list, int), default, what="a rank or a list of ranks")
        if value is None:
            return None
        items = [value] if isinstance(value, int) else value
        out: list[int] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise self.error(key, f"expected integer ranks, got {item!r}")
            if not 0 <= item < world:
                raise self.error(key, f"rank {item} is outside the world of {world} ranks")
            out.append(item)
        if len(set(out)) != len(out):
            raise self.error(key, f"ranks repeat: {out}")
        return tuple(sorted(out))

    def sub(self, key: str, default: Any = ...) -> _Reader | None:
        value = self.get(key, dict, default, what="a table")
        if value is None:
            return None
        return _Reader(self.where, value, f"{self.name(key)}.")

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown field" + _suggest(unknown[0], self.used))


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _suggest(word: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_topology(r: _Reader, trainer: str, fallback: Topology | None = None) -> Topology:
    info = TRAINERS[trainer]
    nodes = r.integer("nodes", fallback.nodes if fallback else 1, minimum=1)
    ppn = r.integer("procs_per_node", fallback.procs_per_node if fallback else ..., minimum=1)
    mesh_table = r.sub("mesh", None)
    world = nodes * ppn
    mesh: tuple[tuple[str, int], ...] = ()
    if mesh_table is not None:
        dims: list[tuple[str, int]] = []
        for name in list(mesh_table.table):
            size = mesh_table.integer(name, minimum=1)
            if not _NAME.fullmatch(name):
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
            f"not the world size {world} ({nodes} x {ppn})",
        )
    if not info.min_world <= world <= info.max_world:
        raise r.error(
            "procs_per_node",
            f"trainer {trainer!r} runs on {info.min_world} to "
            f"{info.max_world} ranks; this world has {world}",
        )
    if nodes < info.min_nodes:
        raise r.error("nodes", f"trainer {trainer!r} needs at least {info.min_nodes} nodes")
    r.finish()
    return Topology(nodes=nodes, procs_per_node=ppn, mesh=mesh)


def _rescale_mesh(
    r: _Reader, mesh: tuple[tuple[str, int], ...], world: int
) -> tuple[tuple[str, int], ...]:
    if math.prod(s for _, s in mesh) == world:
        return mesh
    raise r.error("mesh", f"the world size changed to {world}; give the resuming world's mesh")


def _parse_component(r: _Reader, key: str, topology: Topology) -> ComponentSpec:
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


def _parse_group(r: _Reader, pattern: str, topology: Topology) -> str | tuple[str, ...] | None:
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


def _parse_params(r: _Reader, pattern: str, group: str | tuple[str, ...] | None) -> dict[str, Any]:
    """``params``: the pattern's parameters; checked by building the pattern object."""
    import json

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


def _parse_fault(r: _Reader, world: int, keys: set[str]) -> FaultSpec:
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


def _per_component(r: _Reader, name: str, keys: set[str], read: Callable[[_Reader, str], T]) -> dict[str, T]:
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


def _parse_expect(r: _Reader | None, world: int, keys: set[str]) -> Expectation:
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


def _parse_run(r: _Reader | None) -> RunSpec:
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
    )


#: Trainer knobs a scenario may set under ``[options]``, with their types.
OPTIONS: Mapping[str, type] = MappingProxyType(
    {"hidden": int, "samples": int, "microbatches": int, "lr": float, "dropout": float}
)


def _parse_options(r: _Reader | None) -> Mapping[str, Any]:
    if r is None:
        return {}
    out: dict[str, Any] = {}
    for key in list(r.table):
        if key not in OPTIONS:
            raise r.error(key, "unknown option" + _suggest(key, OPTIONS))
        kind = OPTIONS[key]
        out[key] = r.integer(key, minimum=1) if kind is int else r.get(key, kind)
    if "dropout" in out and not 0.0 <= out["dropout"] < 1.0:
        raise r.error("dropout", f"must be in [0, 1), got {out['dropout']}")
    if "lr" in out and out["lr"] <= 0:
        raise r.error("lr", f"must be positive, got {out['lr']}")
    r.finish()
    return out


def _parse_imports(top: _Reader) -> tuple[str, ...]:
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


def parse_scenario(data: Mapping[str, Any], where: str, default_name: str = "") -> Scenario:
    """Build a :class:`Scenario` from parsed TOML; ``where`` names the file in errors."""
    top = _Reader(where, dict(data))
    name = top.get("name", str, default_name or Path(where).stem)
    if not _NAME.fullmatch(name):
        raise top.error("name", f"{name!r} is not a valid name (letters, digits, '.', '_', '-')")
    description = top.get("description", str, "")
    imports = _parse_imports(top)
    trainer = top.choice("trainer", TRAINERS)
    topo_reader = top.sub("topology")
    assert topo_reader is not None
    topology = _parse_topology(topo_reader, trainer)
    resume_reader = top.sub("resume", None)
    resume = (
        topology if resume_reader is None else _parse_topology(resume_reader, trainer, topology)
    )
    run = _parse_run(top.sub("run", None))
    comps_reader = top.sub("components")
    assert comps_reader is not None
    info = TRAINERS[trainer]
    components: list[ComponentSpec] = []
    for key in list(comps_reader.table):
        if key not in info.components:
            raise comps_reader.error(
                key,
                f"trainer {trainer!r} has no such component "
                f"(it has {', '.join(sorted(info.components))})",
            )
        sub = comps_reader.sub(key)
        assert sub is not None
        components.append(_parse_component(sub, key, topology))
    comps_reader.finish()
    if not components:
        raise comps_reader.error("", "declare at least one component")
    keys = {c.key for c in components}
    faults_raw = top.get("faults", list, [], what="an array of tables ([[faults]])")
    faults = tuple(
        _parse_fault(_Reader(where, f, f"faults[{i}]."), topology.world_size, keys)
        for i, f in enumerate(faults_raw)
    )
    expect = _parse_expect(top.sub("expect", None), topology.world_size, keys)
    options = _parse_options(top.sub("options", None))
    top.finish()
    scenario = Scenario(
        name=name,
        path=where,
        trainer=trainer,
        topology=topology,
        resume_topology=resume,
        run=run,
        components=tuple(components),
        faults=faults,
        expect=expect,
        description=description,
        options=options,
        imports=imports,
    )
    _check_consistency(scenario, top)
    return scenario


def _check_consistency(s: Scenario, top: _Reader) -> None:
    """Cross-field rules: what a positive or elastic scenario can promise."""
    if s.expect.succeeds:
        if s.faults:
            raise top.error("faults", "a scenario with faults must expect an error")
        _check_partitions(s, top)
        if s.elastic:
            fixed = [c.key for c in s.components if not _pattern_class(c.pattern).elastic]
            if fixed:
                raise top.error(
                    "resume",
                    f"components {fixed} are tied to the world's layout and cannot be "
                    "resumed into another world; expect error TopologyMismatchError at load",
                )
        missing = sorted(set(s.expect.writers) ^ {c.key for c in s.components})
        if s.expect.writers and missing:
            raise top.error(
                "expect.writers", f"give the writers of every component; mismatched keys: {missing}"
            )
    elif s.expect.stage == "load" and any(f.kind != "diverge" for f in s.faults):
        raise top.error("faults", "save-phase faults make the save fail; expect stage 'save'")


def _pattern_class(kind: str) -> Any:
    from distckpt.patterns import registered_patterns

    return registered_patterns()[kind]


def _check_partitions(s: Scenario, top: _Reader) -> None:
    """A positive scenario's patterns must partition its saving world (the oracle's derivation)."""
    from harness import oracle

    world = oracle.scenario_world(s.topology)
    for c in s.components:
        try:
            oracle.replica_sets(world, c.pattern, c.params)
        except Exception as exc:  # a user pattern's own code may raise anything
            raise top.error(
                f"components.{c.key}.pattern",
                f"{c.pattern} does not give replica sets for {s.topology.describe()}: "
                f"{type(exc).__name__}: {exc}",
            ) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate one scenario file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc}") from None
    return parse_scenario(data, str(p), default_name=p.stem)


def load_scenarios(paths: Iterable[str | Path]) -> list[Scenario]:
    """Scenarios from files and directories (``*.toml``, sorted by name); names must be unique."""
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(p.glob("*.toml")))
        else:
            files.append(p)
    scenarios = [load_scenario(f) for f in files]
    seen: dict[str, str] = {}
    for s in scenarios:
        if s.name in seen:
            raise ScenarioError(f"{s.path}: name: {s.name!r} is also the name of {seen[s.name]}")
        seen[s.name] = s.path
    return scenarios
