"""Is a saved-then-resumed run bit-identical with its reference? (The runner's last judgement.)

Who uses it: :mod:`harness.runner` and :mod:`harness.worker`, in the parent (or
on rank 0 under torchrun) after every rank reported; nothing collective. Runs
are compared by their loss sequences and by every component's fingerprint
(a digest per state leaf), except the components the load skipped on purpose,
which start fresh in both runs' resuming worlds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.runner import ScenarioResult
    from harness.scenario import Scenario
    from harness.session import RankRun

__all__ = ["compare_elastic", "compare_runs", "record_exactness"]

_MAX_DIFFS = 6


def record_exactness(s: Scenario, diffs: list[str], result: ScenarioResult) -> None:
    """Record whether the resumed run was bit-exact (a problem unless the scenario waives it)."""
    result.bit_exact = not diffs
    if diffs and s.expect.bit_exact:
        result.problems.append("resume is not bit-exact:\n  " + "\n  ".join(diffs[:_MAX_DIFFS]))


def compare_runs(
    reference: list[RankRun],
    saved: list[RankRun],
    resumed: list[RankRun],
    fresh: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Where the saved-then-resumed run differs from the reference (losses, every component's
    state except the ``fresh`` ones, which the load skipped on purpose); empty if bit-exact."""
    diffs: list[str] = []
    for ref, first, last in zip(reference, saved, resumed, strict=True):
        joined = first.losses + last.losses
        if ref.losses != joined:
            diffs.append(
                f"rank {ref.rank} losses differ: reference {_losses(ref.losses)}, "
                f"saved+resumed {_losses(joined)}"
            )
        diffs.extend(_fingerprint_diff(ref.rank, ref.fingerprint, last.fingerprint, fresh))
    return diffs


def compare_elastic(
    first: list[RankRun],
    tail: list[RankRun],
    saved: list[RankRun],
    resumed: list[RankRun],
    fresh: set[str],
) -> list[str]:
    diffs: list[str] = []
    for a, b in zip(first, saved, strict=True):
        if a.losses != b.losses:
            diffs.append(
                f"rank {a.rank} losses before the save differ: "
                f"{_losses(a.losses)} vs {_losses(b.losses)}"
            )
    for ref, last in zip(tail, resumed, strict=True):
        if ref.losses != last.losses:
            diffs.append(
                f"rank {ref.rank} losses after the resume differ: reference "
                f"{_losses(ref.losses)}, resumed {_losses(last.losses)}"
            )
        diffs.extend(_fingerprint_diff(ref.rank, ref.fingerprint, last.fingerprint, fresh))
    return diffs


def _fingerprint_diff(
    rank: int,
    want: dict[str, dict[str, str]],
    got: dict[str, dict[str, str]],
    fresh: set[str] | frozenset[str],
) -> list[str]:
    out: list[str] = []
    for key in sorted((set(want) | set(got)) - set(fresh)):
        a, b = want.get(key, {}), got.get(key, {})
        if a == b:
            continue
        leaves = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = ", ".join(leaves[:4]) + (f" (+{len(leaves) - 4} more)" if len(leaves) > 4 else "")
        out.append(f"rank {rank} {key} differs at {shown}")
    return out


def _losses(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.9g}" for v in values) + "]"
