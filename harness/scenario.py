"""Scenario files: TOML parsed into frozen, validated objects.

A scenario names a trainer, the topology of the world that saves (and, for
elastic or negative scenarios, of the world that resumes), the steps to run and
the step to save at, every component's declaration (and, under
``[resume.components]``, what the resuming world declares differently),
optional faults, and what must happen. Every error names the file and the
field at fault. The format is documented in ``docs/scenarios.md``. A component
may name any registered sharing pattern (``pattern`` plus ``params``); the
modules in the top-level ``imports`` are imported while parsing, so that
patterns of their own are registered before the kinds are checked
(:mod:`harness.patterns`).

The objects live in :mod:`harness.scenario_model`, the section parsers in
:mod:`harness.scenario_parts`; this module puts a file together, checks the
rules that span sections, and loads files and directories.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness._reader import ScenarioError, TableReader
from harness.scenario_model import (
    ERROR_CLASSES,
    FAULT_KINDS,
    LEVELS,
    MAX_WORLD,
    PATTERNS,
    PHASES,
    TRAINERS,
    ComponentSpec,
    Expectation,
    FaultSpec,
    RunSpec,
    Scenario,
    Topology,
    TrainerInfo,
)
from harness.scenario_parts import (
    NAME,
    OPTIONS,
    parse_component,
    parse_expect,
    parse_fault,
    parse_imports,
    parse_options,
    parse_run,
    parse_topology,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ERROR_CLASSES",
    "FAULT_KINDS",
    "LEVELS",
    "MAX_WORLD",
    "OPTIONS",
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
    "TrainerInfo",
    "check_paths",
    "load_scenario",
    "load_scenarios",
    "parse_scenario",
]

#: Fields of a ``[resume.components]`` entry besides a component's own.
_DECLARED = "declared"


def parse_scenario(data: Mapping[str, Any], where: str, default_name: str = "") -> Scenario:
    """Build a :class:`Scenario` from parsed TOML; ``where`` names the file in errors.

    Raises :class:`ScenarioError` (naming the file and the field) on anything malformed.
    """
    top = TableReader(where, dict(data))
    name = top.get("name", str, default_name or Path(where).stem)
    if not NAME.fullmatch(name):
        raise top.error("name", f"{name!r} is not a valid name (letters, digits, '.', '_', '-')")
    description = top.get("description", str, "")
    imports = parse_imports(top)
    trainer = top.choice("trainer", TRAINERS)
    topo_reader = top.sub("topology")
    assert topo_reader is not None
    topology = parse_topology(topo_reader, trainer)
    resume_reader = top.sub("resume", None)
    resume, resume_raw, strict = topology, None, True
    if resume_reader is not None:
        strict = resume_reader.get("strict", bool, True)
        resume_raw = resume_reader.sub("components", None)
        resume = parse_topology(resume_reader, trainer, topology, finish=False)
        resume_reader.finish()
    run = parse_run(top.sub("run", None))
    comps_reader = top.sub("components")
    assert comps_reader is not None
    components = _parse_components(comps_reader, trainer, topology)
    resuming = components if resume_raw is None else _parse_resume_components(
        resume_raw, comps_reader, trainer, resume, components
    )
    keys = {c.key for c in components}
    faults_raw = top.get("faults", list, [], what="an array of tables ([[faults]])")
    faults = tuple(
        parse_fault(TableReader(where, f, f"faults[{i}]."), topology.world_size, keys)
        for i, f in enumerate(faults_raw)
    )
    expect = parse_expect(top.sub("expect", None), topology.world_size, keys)
    options = parse_options(top.sub("options", None))
    top.finish()
    scenario = Scenario(
        name=name,
        path=where,
        trainer=trainer,
        topology=topology,
        resume_topology=resume,
        run=run,
        components=components,
        faults=faults,
        expect=expect,
        description=description,
        options=options,
        imports=imports,
        resume_components=resuming,
        resume_strict=strict,
    )
    _check_consistency(scenario, top)
    return scenario


def _check_offered(r: TableReader, key: str, trainer: str) -> None:
    info = TRAINERS[trainer]
    if key not in info.components:
        raise r.error(
            key,
            f"trainer {trainer!r} has no such component "
            f"(it has {', '.join(sorted(info.components))})",
        )


def _parse_components(r: TableReader, trainer: str, topology: Topology) -> tuple[ComponentSpec, ...]:
    components: list[ComponentSpec] = []
    for key in list(r.table):
        _check_offered(r, key, trainer)
        sub = r.sub(key)
        assert sub is not None
        components.append(parse_component(sub, key, topology))
    r.finish()
    if not components:
        raise r.error("", "declare at least one component")
    return tuple(components)


def _parse_resume_components(
    r: TableReader,
    saved_reader: TableReader,
    trainer: str,
    topology: Topology,
    saved: tuple[ComponentSpec, ...],
) -> tuple[ComponentSpec, ...]:
    """``[resume.components]``: the resuming world adds, changes or drops declarations.

    An entry for a key the saving world does not declare is a whole declaration.
    An entry for a saved key changes the fields it gives (``required``,
    ``validate``, ``level``; giving ``pattern`` replaces the whole declaration),
    and ``declared = false`` leaves the key undeclared in the resuming world.
    """
    by_key = {c.key: c for c in saved}
    changed: dict[str, ComponentSpec | None] = {}
    for key in list(r.table):
        _check_offered(r, key, trainer)
        raw = r.get(key, dict, what="a table")
        if raw.get(_DECLARED, True) is False and set(raw) == {_DECLARED}:
            if key not in by_key:
                raise r.error(key, "declared = false drops a saved component; the saving world does not declare it")
            changed[key] = None
            continue
        merged = dict(raw)
        if key in by_key and "pattern" not in raw:
            merged = {**saved_reader.table[key], **raw}
        sub = TableReader(r.where, merged, r.name(key) + ".")
        if sub.get(_DECLARED, bool, True) is not True:
            raise sub.error(_DECLARED, "declared = false stands alone: give no other field with it")
        changed[key] = parse_component(sub, key, topology)
    r.finish()
    out = [changed.get(c.key, c) for c in saved]
    out += [c for k, c in changed.items() if k not in by_key]
    declared = tuple(c for c in out if c is not None)
    if not declared:
        raise r.error("", "the resuming world must declare at least one component")
    return declared


def _check_consistency(s: Scenario, top: TableReader) -> None:
    """Cross-field rules: what a positive, elastic or resume-changing scenario can promise."""
    if s.expect.succeeds:
        if s.faults:
            raise top.error("faults", "a scenario with faults must expect an error")
        _check_partitions(s, top)
        if s.elastic:
            loaded = set(s.expected_loaded())
            fixed = [c.key for c in s.resuming if c.key in loaded and not _pattern_class(c.pattern).elastic]
            if fixed:
                raise top.error(
                    "resume",
                    f"components {fixed} are tied to the world's layout and cannot be "
                    "resumed into another world; expect error TopologyMismatchError at load",
                )
        saved = {c.key for c in s.components}
        added = [c.key for c in s.resuming if c.key not in saved and c.required]
        if added:
            raise top.error(
                "resume.components",
                f"{added} are required but not in the checkpoint, so the load fails; "
                "set required = false, or expect error ComponentMismatchError at load",
            )
        dropped = sorted(saved - {c.key for c in s.resuming})
        if dropped and s.resume_strict:
            raise top.error(
                "resume.components",
                f"the checkpoint holds {dropped}, which the resuming world does not declare; a strict "
                "load refuses that: set resume.strict = false, or expect an error at load",
            )
        missing = sorted(set(s.expect.writers) ^ saved)
        if s.expect.writers and missing:
            raise top.error(
                "expect.writers", f"give the writers of every component; mismatched keys: {missing}"
            )
    elif s.expect.stage == "load" and any(f.kind != "diverge" for f in s.faults):
        raise top.error("faults", "save-phase faults make the save fail; expect stage 'save'")


def _pattern_class(kind: str) -> Any:
    from distckpt.patterns import registered_patterns

    return registered_patterns()[kind]


def _check_partitions(s: Scenario, top: TableReader) -> None:
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
    """Read and validate one scenario file; :class:`ScenarioError` naming the file if it is bad."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc}") from None
    return parse_scenario(data, str(p), default_name=p.stem)


def _files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(p.glob("*.toml")))
        else:
            files.append(p)
    return files


def check_paths(paths: Iterable[str | Path]) -> tuple[list[Scenario], list[str]]:
    """Every scenario that parses, and one message per bad file (or repeated name).

    Reads every file even when earlier ones are bad, so that ``harness check``
    reports all of them at once.
    """
    scenarios: list[Scenario] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    for f in _files(paths):
        try:
            s = load_scenario(f)
        except ScenarioError as exc:
            errors.append(str(exc))
            continue
        if s.name in seen:
            errors.append(f"{s.path}: name: {s.name!r} is also the name of {seen[s.name]}")
            continue
        seen[s.name] = s.path
        scenarios.append(s)
    return scenarios, errors


def load_scenarios(paths: Iterable[str | Path]) -> list[Scenario]:
    """Scenarios from files and directories (``*.toml``, sorted by name); names must be unique.

    Raises :class:`ScenarioError` listing every bad file (one per line) when any is bad.
    """
    scenarios, errors = check_paths(paths)
    if errors:
        raise ScenarioError("\n".join(errors))
    return scenarios
