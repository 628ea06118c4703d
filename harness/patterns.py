"""Sharing patterns named by scenario files: user modules to import, pattern objects to build.

A scenario's top-level ``imports`` lists modules that register patterns of
their own (``@distckpt.register_pattern``): a dotted module name is imported
as usual; a path ending in ``.py`` is resolved against the scenario file's
directory and imported from that file. The parser imports them
(:func:`load_imports`) before it checks the components' kinds, and every rank
process imports them again before it builds its components
(:func:`harness.session.coordinator`), since rank processes do not inherit the
parent's imports.

Importing is idempotent: a file is imported once per process under a name
derived from its absolute path, and a file already imported under another name
(``examples.patterns.per_local_rank``) is not imported again, so its patterns
are never registered twice.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["ImportFailed", "build_pattern", "load_imports", "resolve_import"]

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class ImportFailed(Exception):
    """A scenario's import could not be resolved or imported; the message says why."""


def resolve_import(entry: str, base_dir: Path) -> str:
    """The import an ``imports`` entry names: an absolute ``.py`` path, or a dotted module name.

    Called by the parser. A relative path is resolved against ``base_dir`` (the
    scenario file's directory). Raises :class:`ImportFailed` for a path that is
    not a file and for text that is neither a path nor a module name.
    """
    if entry.endswith(".py") or "/" in entry or "\\" in entry:
        path = (base_dir / entry).resolve()
        if path.suffix != ".py":
            raise ImportFailed(f"{entry!r} is not a .py file")
        if not path.is_file():
            raise ImportFailed(f"{entry!r} resolves to {path}, which is not a file")
        return str(path)
    if _DOTTED.fullmatch(entry) is None:
        raise ImportFailed(f"{entry!r} is neither a module name nor a path ending in .py")
    return entry


def load_imports(imports: Iterable[str]) -> None:
    """Import every resolved entry (see :func:`resolve_import`) in this process.

    Called by the parser and by every rank process before it builds its
    components. Idempotent. Raises :class:`ImportFailed` naming the entry and
    the error when an import fails (the module's own exception is chained).
    """
    for entry in imports:
        try:
            if entry.endswith(".py") and Path(entry).is_absolute():
                _import_file(Path(entry))
            else:
                importlib.import_module(entry)
        except ImportFailed:
            raise
        except Exception as exc:
            raise ImportFailed(f"importing {entry} failed: {type(exc).__name__}: {exc}") from exc


def _import_file(path: Path) -> ModuleType:
    for module in list(sys.modules.values()):
        known = getattr(module, "__file__", None)
        if known and Path(known).resolve() == path:
            return module
    canonical = _module_name_on_path(path)
    if canonical is not None:  # one module object whichever way a test or scenario names it
        return importlib.import_module(canonical)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_scenario_patterns_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportFailed(f"cannot import {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _module_name_on_path(path: Path) -> str | None:
    """The dotted name under which ``path`` is importable from ``sys.path``, if any.

    Importing a file by that name (rather than a synthetic one) means that a later
    ``import examples.patterns.per_local_rank`` finds the same module, instead of
    running it again and registering its patterns a second time.
    """
    for entry in sys.path:
        try:
            rel = path.relative_to(Path(entry or ".").resolve())
        except (ValueError, OSError):
            continue
        parts = rel.with_suffix("").parts
        if not parts or not all(p.isidentifier() for p in parts):
            continue
        name = ".".join(parts)
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin and Path(spec.origin).resolve() == path:
            return name
    return None


def build_pattern(kind: str, params: Mapping[str, Any]) -> Any:
    """The registered pattern object of ``kind`` with ``params`` (a ``distckpt.Pattern``).

    Called by the parser (to check the declaration) and by
    :func:`harness.session.coordinator`. Raises ``LookupError`` for a kind that
    is not registered and ``ValueError`` for params the class refuses.
    """
    from distckpt.patterns import pattern_from_record

    return pattern_from_record(kind, params)
