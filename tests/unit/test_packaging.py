"""The package list in pyproject.toml names every Python package we ship.

setuptools installs exactly the packages listed; a sub-package missing from the list
still works in an editable install and breaks only in the wheel, so it is checked here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]


def _listed() -> tuple[set[str], dict[str, str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    return set(config["packages"]), dict(config["package-dir"])


def _found(top: str, folder: Path) -> set[str]:
    return {
        ".".join((top, *init.parent.relative_to(folder).parts))
        for init in folder.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_every_package_directory_is_listed_for_the_wheel() -> None:
    listed, roots = _listed()
    found: set[str] = set()
    for top, folder in roots.items():
        found |= _found(top, ROOT / folder)
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_every_listed_package_exists() -> None:
    listed, roots = _listed()
    for name in listed:
        top, *rest = name.split(".")
        assert (ROOT / roots[top]).joinpath(*rest, "__init__.py").is_file(), name
