"""Run scenarios in warm worlds and judge them.

For a positive scenario: a reference world trains ``steps`` steps; a saving
world trains ``save_at`` steps and saves; the checkpoint on disk is checked
against :mod:`harness.oracle`; a fresh resuming world loads and trains to
``steps``. Parameters, optimizer state, scheduler, data position, every rank's
generators and the loss sequence must be bit-identical with the reference.
For a negative scenario: the expected error class must be raised by every
surviving rank at the expected stage (the same class everywhere, naming the
expected failing ranks when given), and a failed save must leave nothing
committed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distckpt.testing.pool import RankOutcome, WorldPool, WorldSpec, WorldTimeout
from harness import oracle, session
from harness.exactness import compare_elastic, compare_runs, record_exactness
from harness.scenario import Scenario, Topology

__all__ = [
    "Failed",
    "ScenarioResult",
    "check_error",
    "check_resumed",
    "check_saved",
    "compare_runs",
    "new_result",
    "record_exactness",
    "run_scenario",
    "run_scenarios",
]



@dataclass
class ScenarioResult:
    """The verdict on one scenario and the figures of its table row."""

    name: str
    trainer: str
    world: str
    path: str
    components: int
    expectation: str
    files: int | None = None
    bytes: int | None = None
    save_s: float | None = None
    load_s: float | None = None
    bit_exact: bool | None = None
    met: bool = False
    problems: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class Failed(Exception):
    """A scenario fell short; the message says how (collected into ``problems``)."""


def run_scenarios(
    pool: WorldPool,
    scenarios: Sequence[Scenario],
    workdir: str | os.PathLike[str] | None = None,
    on_result: Callable[[ScenarioResult], None] | None = None,
) -> list[ScenarioResult]:
    """Run every scenario in turn; ``on_result`` is called as each one finishes."""
    results = []
    for scenario in scenarios:
        result = run_scenario(pool, scenario, workdir)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def new_result(scenario: Scenario) -> ScenarioResult:
    """An empty result row for ``scenario``."""
    return ScenarioResult(
        name=scenario.name,
        trainer=scenario.trainer,
        world=scenario.describe_world(),
        path=scenario.path,
        components=len(scenario.components),
        expectation="success"
        if scenario.expect.succeeds
        else f"{scenario.expect.error} at {scenario.expect.stage}",
    )


def run_scenario(
    pool: WorldPool, scenario: Scenario, workdir: str | os.PathLike[str] | None = None
) -> ScenarioResult:
    """Run one scenario; checkpoints go to ``<workdir>/<name>/`` (kept) or a temp dir (removed)."""
    started = time.perf_counter()
    result = new_result(scenario)
    keep = workdir is not None
    if workdir is not None:
        out = Path(workdir, scenario.name)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-"))
    if keep and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if scenario.expect.succeeds:
            _run_positive(pool, scenario, out, result)
        else:
            _run_negative(pool, scenario, out, result)
    except Failed as exc:
        result.problems.append(str(exc))
    except WorldTimeout as exc:
        result.problems.append(f"world timed out: {_shorten(str(exc), 4000)}")
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    result.met = not result.problems
    result.seconds = time.perf_counter() - started
    return result


# ------------------------------------------------------------------ worlds


def _spec(topology: Topology, workdir: Path | None = None) -> WorldSpec:
    return WorldSpec(
        nodes=topology.nodes,
        procs_per_node=topology.procs_per_node,
        workdir=None if workdir is None else str(workdir),
    )


def _values(outcomes: list[RankOutcome], what: str) -> list[session.RankRun]:
    """The RankRun of every rank, or ``Failed`` with every failed rank's story."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        details = "\n".join(_shorten(o.describe(), 1500) for o in failed)
        raise Failed(f"{what}: {len(failed)} of {len(outcomes)} ranks failed:\n{details}")
    return [o.value for o in outcomes]


def _no_library_errors(runs: list[session.RankRun], what: str) -> None:
    errors = [(r.rank, r.error) for r in runs if r.error is not None]
    if errors:
        err = errors[0][1]
        assert err is not None
        raise Failed(
            f"{what}: ranks {[r for r, _ in errors]} raised {err.error_type}: "
            f"{_shorten(err.message, 1500)}"
        )


# ---------------------------------------------------------------- positive


def _run_positive(pool: WorldPool, s: Scenario, out: Path, result: ScenarioResult) -> None:
    timeout = s.run.world_timeout
    if s.elastic:
        first = _values(
            pool.run(_spec(s.topology), session.handoff_start, s, timeout=timeout),
            "reference (to the save step)",
        )
        handed = {key: first[0].state for key in s.expected_loaded()}
        states = {k: v[k] for k, v in handed.items() if v is not None}
        ref_tail = _values(
            pool.run(_spec(s.resume_topology), session.handoff_finish, s, states, timeout=timeout),
            "reference (in-memory hand-over to the resumed world)",
        )
    saved = _values(pool.run(_spec(s.topology, out), session.save, s, timeout=timeout), "save")
    check_saved(s, saved, out, result)
    resumed = _values(
        pool.run(
            _spec(s.resume_topology, out), session.resume, s, s.resume_topology, timeout=timeout
        ),
        "resume",
    )
    check_resumed(s, resumed, result)
    fresh = set(s.expected_skipped())  # skipped at load: they start fresh, as a new trainer's
    if s.elastic:
        diffs = compare_elastic(first, ref_tail, saved, resumed, fresh)
    else:
        reference = _values(
            pool.run(_spec(s.topology), session.reference, s, timeout=timeout), "reference"
        )
        diffs = compare_runs(reference, saved, resumed, fresh)
    record_exactness(s, diffs, result)


def check_saved(
    s: Scenario,
    saved: list[session.RankRun],
    out: Path,
    result: ScenarioResult,
    topology: Topology | None = None,
) -> str:
    """Judge a successful save: one path on every rank, where expected, as the oracle says."""
    _no_library_errors(saved, "save")
    paths = {r.path for r in saved}
    if len(paths) != 1:
        raise Failed(f"save: ranks returned different paths: {sorted(map(str, paths))}")
    path = str(saved[0].path)
    result.checkpoint = path
    result.save_s = max(r.seconds for r in saved)
    expected_path = os.path.join(out, "checkpoints", f"checkpoint-{s.run.save_at}")
    if os.path.realpath(path) != os.path.realpath(expected_path):
        result.problems.append(f"checkpoint at {path}, expected {expected_path}")
    result.problems.extend(f"oracle: {p}" for p in oracle.check_checkpoint(path, s, topology))
    result.files, result.bytes = _manifest_totals(path, result)
    return path


def check_resumed(s: Scenario, resumed: list[session.RankRun], result: ScenarioResult) -> None:
    """Judge a successful load: no error, on every rank every component declared in both
    worlds loaded, and exactly the ones the resuming world adds or drops skipped."""
    _no_library_errors(resumed, "resume")
    result.load_s = max(r.seconds for r in resumed)
    declared = s.expected_loaded()
    skipped = s.expected_skipped()
    for r in resumed:
        if sorted(r.loaded) != declared:
            result.problems.append(f"rank {r.rank} loaded {sorted(r.loaded)}, expected {declared}")
        if dict(r.skipped) != skipped:
            result.problems.append(f"rank {r.rank} skipped {dict(r.skipped)}, expected {skipped}")


def _manifest_totals(path: str, result: ScenarioResult) -> tuple[int | None, int | None]:
    """(files, bytes) from the manifest, read through distckpt's public API."""
    from distckpt import CheckpointManifest, ManifestError

    try:
        manifest = CheckpointManifest.load(path)
    except ManifestError as exc:
        result.problems.append(f"manifest: {exc}")
        return None, None
    entries = [f for c in manifest.components.values() for f in c.files]
    return len(entries), sum(f.size_bytes for f in entries)


# ---------------------------------------------------------------- negative


def _run_negative(pool: WorldPool, s: Scenario, out: Path, result: ScenarioResult) -> None:
    timeout = s.run.world_timeout
    killed = {r for f in s.faults if f.kind == "sigkill" for r in f.ranks}
    outcomes = pool.run(_spec(s.topology, out), session.save, s, timeout=timeout)
    if s.expect.stage == "save":
        runs = _survivors(outcomes, killed, "save")
        result.save_s = max((r.seconds for r in runs), default=None)
        check_error(s, runs, "save", result)
        committed = _committed(out)
        if committed:
            raise Failed(f"save failed but left committed checkpoints: {committed}")
        return
    check_saved(s, _values(outcomes, "save"), out, result)
    resumed = _values(
        pool.run(
            _spec(s.resume_topology, out), session.resume, s, s.resume_topology, timeout=timeout
        ),
        "resume",
    )
    result.load_s = max(r.seconds for r in resumed)
    check_error(s, resumed, "load", result)


def _survivors(outcomes: list[RankOutcome], killed: set[int], what: str) -> list[session.RankRun]:
    runs: list[session.RankRun] = []
    problems: list[str] = []
    for o in outcomes:
        if o.rank in killed:
            if o.exit_code != -9:
                problems.append(
                    f"rank {o.rank} should have been killed by its fault; "
                    f"it ended with {'a value' if o.ok else o.error_type}"
                )
            continue
        if not o.ok:
            problems.append(_shorten(o.describe(), 1500))
        else:
            runs.append(o.value)
    if problems:
        raise Failed(f"{what}: " + "\n".join(problems))
    return runs


def check_error(
    s: Scenario, runs: list[session.RankRun], stage: str, result: ScenarioResult
) -> None:
    want = s.expect.error
    assert want is not None
    clean = [r.rank for r in runs if r.error is None]
    if clean:
        raise Failed(f"{stage}: expected {want} on every rank; ranks {clean} raised nothing")
    errors = [r.error for r in runs if r.error is not None]
    kinds = sorted({e.error_type for e in errors})
    if len(kinds) != 1:
        raise Failed(
            f"{stage}: ranks raised different error classes {kinds}; every rank must raise the same"
        )
    first = errors[0]
    result.detail = (
        f"every rank raised {first.error_type} in phase {first.phase}, failing ranks "
        f"{sorted(first.failures)}: {_shorten(first.message, 600)}"
    )
    if want not in first.classes:
        raise Failed(
            f"{stage}: expected {want}, got {first.error_type}: {_shorten(first.message, 1500)}"
        )
    if s.expect.failing_ranks is not None:
        for r, e in zip(runs, errors, strict=True):
            if tuple(sorted(e.failures)) != s.expect.failing_ranks:
                raise Failed(
                    f"{stage}: rank {r.rank} reports failing ranks {sorted(e.failures)}, "
                    f"expected {list(s.expect.failing_ranks)}"
                )
    failures = {tuple(sorted(e.failures)) for e in errors}
    if len(failures) != 1:
        raise Failed(
            f"{stage}: ranks disagree on which ranks failed: {[sorted(e.failures) for e in errors]}"
        )


def _committed(out: Path) -> list[str]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / oracle.MANIFEST).is_file())


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 20] + " ... [truncated]"
