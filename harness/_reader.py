"""Typed, field-naming access to one table of a parsed TOML file (scenario files).

Who uses it: the scenario parser (:mod:`harness.scenario_parts`,
:mod:`harness.scenario`) only. Every error is a :class:`ScenarioError` whose
message names the file and the dotted field, for example
``scenarios/x.toml: run.save_at: must be <= steps (6), got 9``. Unknown fields
are errors too, with a suggestion for a near miss.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = ["ScenarioError", "TableReader", "suggest"]


class ScenarioError(ValueError):
    """A scenario file is malformed; the message names the file and the field."""


class TableReader:
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

    def sub(self, key: str, default: Any = ...) -> TableReader | None:
        value = self.get(key, dict, default, what="a table")
        if value is None:
            return None
        return TableReader(self.where, value, f"{self.name(key)}.")

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown field" + suggest(unknown[0], self.used))


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


def suggest(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known``, or nothing."""
    close = difflib.get_close_matches(word, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
