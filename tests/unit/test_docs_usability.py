"""The trainer guide stays complete and first in line (issue 14)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import distckpt
from distckpt import CheckpointCoordinator, errors
from distckpt.manifest import FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]
TRAINER = (ROOT / "docs" / "trainer.md").read_text()


def _table_rows(text: str) -> dict[str, str]:
    """``{option: default}`` from every markdown table row ``| `name` | default | ... |``."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`\w+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


@pytest.mark.parametrize("function", [CheckpointCoordinator.__init__, CheckpointCoordinator.save_checkpoint,
                                      CheckpointCoordinator.load_checkpoint], ids=lambda f: f.__name__)
def test_the_trainer_guide_lists_every_option_with_its_default(function: object) -> None:
    rows = _table_rows(TRAINER)
    for name, parameter in inspect.signature(function).parameters.items():  # type: ignore[arg-type]
        if name == "self":
            continue
        assert name in rows, f"docs/trainer.md lists no option {name!r}"
        default = parameter.default
        if default is inspect.Parameter.empty:
            assert rows[name] == "(required)"
        elif isinstance(default, bool) or default is None or isinstance(default, str):
            assert rows[name] == f"`{default!r}`".replace("'", '"'), (name, rows[name])
        elif isinstance(default, float):
            assert rows[name].startswith(f"`{default!r}`"), (name, rows[name])
        else:
            assert rows[name] == f"{default // 2**20} MiB", (name, rows[name])


def test_the_trainer_guide_says_what_to_do_on_every_error_class() -> None:
    rows = _table_rows(TRAINER)
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.CheckpointError) and cls is not errors.CheckpointError:
            assert name in rows, f"docs/trainer.md: no row for {name}"


def test_readme_and_index_send_a_trainer_author_to_the_trainer_guide_first() -> None:
    readme = (ROOT / "README.md").read_text()
    docs_links = re.findall(r"docs/\w+\.md", readme)
    assert docs_links[0] == "docs/trainer.md"
    assert "load_checkpoint(missing_ok=True)" in readme
    index = (ROOT / "docs" / "index.md").read_text()
    assert re.findall(r"\]\((\w+\.md)\)", index)[0] == "trainer.md"
    read_next = index.split("## Read next", 1)[1]
    assert re.findall(r"\]\((\w+\.md)\)", read_next)[0] == "trainer.md"


def test_every_format_version_shown_in_the_docs_is_the_current_one() -> None:
    shown = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        shown += [(path.name, v) for v in re.findall(r"\(format (\d+\.\d+)\)", path.read_text())]
    assert shown and all(v == FORMAT_VERSION for _, v in shown), shown


def test_the_public_api_exports_the_new_error() -> None:
    assert distckpt.StateMismatchError.__mro__[1:3] == (errors.CheckpointError, ValueError)
