"""What a scenario file says, as frozen objects (no parsing here; see :mod:`harness.scenario`).

A :class:`Scenario` names a trainer, the topology of the world that saves and
of the world that resumes, the steps to run and the step to save at, every
component's declaration in the saving world and in the resuming world,
optional faults, and what must happen. Component declarations are
:class:`distckpt.testing.declare.Declaration` objects (``ComponentSpec`` is the
same class under the harness's older name), shared with the test suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import distckpt.errors as distckpt_errors
from distckpt.testing.declare import LEVELS, Declaration
from distckpt.testing.worldspec import normalise_sizes, sizes_of

__all__ = [
    "ERROR_CLASSES",
    "FAULT_KINDS",
    "LEVELS",
    "MAX_WORLD",
    "PATTERNS",
    "PHASES",
    "TRAINERS",
    "ComponentSpec",
    "Expectation",
    "FaultSpec",
    "RunSpec",
    "Scenario",
    "Topology",
    "TrainerInfo",
]

#: Sharing patterns, by the values distckpt's ``SharingPattern`` uses.
PATTERNS: tuple[str, ...] = ("global", "replicated", "per_rank", "per_node", "per_group")
#: Save phases at which a fault can be injected (distckpt's ``phase_hook`` names).
PHASES: tuple[str, ...] = ("plan", "validate", "write", "commit")
#: Fault kinds: raise an exception or SIGKILL in a save phase; diverge a replica before saving.
FAULT_KINDS: tuple[str, ...] = ("raise", "sigkill", "diverge")
#: Error classes a negative scenario may expect (names exported by distckpt).
ERROR_CLASSES: tuple[str, ...] = tuple(
    name for name in distckpt_errors.__all__
    if isinstance(getattr(distckpt_errors, name), type)
)
#: The largest world a scenario may ask for (the simulated cluster runs every rank on this machine).
MAX_WORLD = 32

#: One component's declaration: the testing package's one declaration dataclass.
ComponentSpec = Declaration


@dataclass(frozen=True)
class TrainerInfo:
    """What a trainer needs from a topology and which components it offers."""

    mesh_dims: tuple[str, ...]
    components: frozenset[str]
    min_world: int = 1
    max_world: int = MAX_WORLD
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


@dataclass(frozen=True)
class Topology:
    """A world of ``nodes`` nodes, optionally with a named mesh.

    ``procs_per_node`` is the size of every node, or a tuple with each node's
    size (``(3, 2, 1)``: nodes of different sizes); equal sizes are stored as
    one int. Ranks are numbered node by node. ``mesh`` lists ``(dimension name,
    size)`` in row-major order (the last dimension varies fastest over
    consecutive ranks); its sizes multiply to the world size. Construction
    raises ``ValueError`` on a malformed shape.
    """

    nodes: int
    procs_per_node: int | tuple[int, ...]
    mesh: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        nodes, ppn = normalise_sizes(self.nodes, self.procs_per_node, "Topology")
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "procs_per_node", ppn)

    @property
    def node_sizes(self) -> tuple[int, ...]:
        """The number of ranks on each node."""
        return sizes_of(self.nodes, self.procs_per_node)

    @property
    def uneven(self) -> bool:
        """True when nodes have different sizes."""
        return isinstance(self.procs_per_node, tuple)

    @property
    def world_size(self) -> int:
        """Total number of ranks."""
        return sum(self.node_sizes)

    @property
    def mesh_sizes(self) -> dict[str, int]:
        """Mesh dimension name -> size."""
        return dict(self.mesh)

    def describe(self) -> str:
        """``2x4`` (nodes x procs per node) or ``3+2+1`` (uneven nodes), with the mesh if any."""
        if self.uneven:
            text = "+".join(str(n) for n in self.node_sizes)
        else:
            text = f"{self.nodes}x{self.procs_per_node}"
        if self.mesh:
            text += " " + "x".join(f"{n}{s}" for n, s in self.mesh)
        return text


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


#: How the save run saves: ``save_checkpoint()``; ``async_save=True`` (the next step runs while
#: the files are written); ``async_save=True, background_staging=True`` (the next step's forward and
#: backward also overlap the host copy; the trainer waits for it before the optimizer step).
SAVE_MODES = ("sync", "async", "async_background_staging")


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
    save_mode: str = "sync"  # one of SAVE_MODES
    direct_io: bool = False  # the coordinator's direct_io (O_DIRECT writes)


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
    """One parsed scenario file.

    ``components`` are the saving world's declarations; ``resume_components``
    the resuming world's (the same unless ``[resume.components]`` adds, changes
    or drops some), loaded with ``load_checkpoint(strict=resume_strict)``.
    """

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
    resume_components: tuple[ComponentSpec, ...] | None = None
    resume_strict: bool = True

    def __post_init__(self) -> None:
        if self.resume_components is None:
            object.__setattr__(self, "resume_components", self.components)

    @property
    def elastic(self) -> bool:
        """True when the resuming world differs from the saving world."""
        return self.resume_topology != self.topology

    @property
    def resuming(self) -> tuple[ComponentSpec, ...]:
        """The resuming world's declarations."""
        assert self.resume_components is not None
        return self.resume_components

    def component(self, key: str) -> ComponentSpec:
        """The saving world's declaration of ``key``."""
        for c in self.components:
            if c.key == key:
                return c
        raise KeyError(key)

    def expected_skipped(self) -> dict[str, str]:
        """Components a successful load reports as skipped, with the library's reasons.

        A component the resuming world adds (it must be optional) is not in the
        checkpoint; one it does not declare is in the checkpoint but skipped
        (only under ``strict = false``).
        """
        saved = {c.key for c in self.components}
        resumed = {c.key for c in self.resuming}
        out = {k: "optional component not in checkpoint" for k in sorted(resumed - saved)}
        out.update({k: "in checkpoint but not declared" for k in sorted(saved - resumed)})
        return out

    def expected_loaded(self) -> list[str]:
        """Keys a successful load restores: declared in both worlds."""
        saved = {c.key for c in self.components}
        return sorted(c.key for c in self.resuming if c.key in saved)

    def describe_world(self) -> str:
        """``2x2``, or ``1x4->1x2`` for an elastic scenario."""
        if self.elastic:
            return f"{self.topology.describe()}->{self.resume_topology.describe()}"
        return self.topology.describe()

