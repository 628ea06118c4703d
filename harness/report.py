"""The main job's table: one row per scenario, then the problems of those that fell short."""

from __future__ import annotations

from collections.abc import Sequence

from harness.runner import ScenarioResult

__all__ = ["format_problems", "format_row", "format_summary", "table_header"]

_COLUMNS = (
    ("scenario", 30, "<"),
    ("layout", 15, "<"),
    ("world", 16, "<"),
    ("comps", 5, ">"),
    ("files", 5, ">"),
    ("bytes", 9, ">"),
    ("save s", 7, ">"),
    ("load s", 7, ">"),
    ("bit-exact", 9, "^"),
    ("expectation", 32, "<"),
    ("met", 4, "^"),
)


def _line(cells: Sequence[str], name_width: int) -> str:
    """One row; a cell wider than its column widens it (nothing is ever cut)."""
    widths = [max(name_width, _COLUMNS[0][1]), *(w for _, w, _ in _COLUMNS[1:])]
    parts = [
        f"{cell:{align}{width}}"
        for cell, width, (_, _, align) in zip(cells, widths, _COLUMNS, strict=True)
    ]
    return "  ".join(parts).rstrip()


def table_header(name_width: int = 0) -> str:
    """The column titles and a rule; ``name_width``: the longest scenario name to come."""
    titles = _line([name for name, _, _ in _COLUMNS], name_width)
    return f"{titles}\n{'-' * len(titles)}"


def _num(value: float | int | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def format_row(r: ScenarioResult, name_width: int = 0) -> str:
    """One scenario's row, its name in full (``name_width`` as given to :func:`table_header`)."""
    return _line(
        [
            r.name,
            r.trainer,
            r.world,
            str(r.components),
            _num(r.files, "d"),
            _num(r.bytes, ",d"),
            _num(r.save_s, ".3f"),
            _num(r.load_s, ".3f"),
            _yes(r.bit_exact),
            r.expectation,
            _yes(r.met),
        ],
        name_width,
    )


def format_problems(results: Sequence[ScenarioResult]) -> str:
    """What went wrong, scenario by scenario (empty when all met their expectation)."""
    blocks = []
    for r in results:
        if r.problems:
            body = "\n".join(f"  - {p}".replace("\n", "\n    ") for p in r.problems)
            blocks.append(f"{r.name} ({r.path}) fell short:\n{body}")
    return "\n\n".join(blocks)


def format_summary(results: Sequence[ScenarioResult], seconds: float) -> str:
    """``N scenarios: M met, K fell short in S s``."""
    met = sum(r.met for r in results)
    short = len(results) - met
    verdict = "all met their expectation" if not short else f"{short} fell short"
    return f"{len(results)} scenarios: {met} met, {verdict} ({seconds:.1f} s)"
