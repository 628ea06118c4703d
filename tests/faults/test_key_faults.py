"""Hostile names: rejected where they are declared, and nothing is ever written.

Keys, group names and checkpoint ids become path segments; each hostile value
is refused with a ``ValueError`` naming the field, and the whole directory tree
around the output directory is unchanged afterwards (no file, no directory, no
escape to a parent).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distckpt import CheckpointCoordinator, CheckpointError, ManifestError, StateComponent
from tests.faults import scenario
from tests.helpers import Box
from tests.property import worlds
from tests.property.strategies import Example, Topo

pytestmark = pytest.mark.timeout(60)

HOSTILE = {
    "parent-escape": "../x",
    "nested-escape": "a/../../b",
    "absolute": "/abs",
    "empty": "",
    "dot": ".",
    "dot-dot": "..",
    "nul": "a\0b",
    "backslash": "a\\b",
    "backslash-escape": "..\\x",
    "over-long": "k" * 129,
    "separator": "a/b",
    "leading-dash": "-rf",
    "newline": "model\n",
}


def _tree(root: Path) -> set[str]:
    """Every path under ``root``'s parent (where an escape would land)."""
    base = root.parent
    return {str(p.relative_to(base)) for p in base.rglob("*")}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


@pytest.mark.parametrize("key", list(HOSTILE.values()), ids=list(HOSTILE))
def test_an_unsafe_component_key_is_rejected_at_declaration_and_nothing_is_written(out: Path, key: str) -> None:
    before = _tree(out)
    for pattern in ("global", "replicated", "per_rank", "per_node"):
        with pytest.raises(ValueError, match=r"^key: "):
            StateComponent(key, Box({"w": 1}), pattern)
    assert _tree(out) == before


@pytest.mark.parametrize("name", list(HOSTILE.values()), ids=list(HOSTILE))
def test_an_unsafe_group_name_is_rejected_at_declaration_and_nothing_is_written(out: Path, name: str) -> None:
    before = _tree(out)
    with pytest.raises(ValueError, match=r"^process_group_name: "):
        StateComponent("model", Box({}), "per_group", process_group_name=name)
    with pytest.raises(ValueError, match=r"^process_groups: "):
        CheckpointCoordinator([StateComponent("model", Box({}), "global")], process_groups={name: (0,)},
                              output_dir=out)
    assert _tree(out) == before


@pytest.mark.parametrize(("first", "second"), [("Model", "model"), ("OPT.state", "opt.STATE"), ("a-B_1", "A-b_1")])
def test_case_twin_keys_and_group_names_are_rejected_before_anything_is_written(out: Path, first: str, second: str) -> None:
    before = _tree(out)
    with pytest.raises(ValueError, match="collide"):
        CheckpointCoordinator([StateComponent(first, Box({}), "global"), StateComponent(second, Box({}), "global")],
                              output_dir=out)
    with pytest.raises(ValueError, match="collide"):
        CheckpointCoordinator([StateComponent("m", Box({}), "per_group", process_group_name=first)],
                              process_groups={first: (0,), second: (0,)}, output_dir=out)
    assert _tree(out) == before


@pytest.mark.parametrize("cid", ["../x", "a/../../b", "/abs", "..", "a\0b", "a\\b", "k" * 129],
                         ids=["parent-escape", "nested-escape", "absolute", "dot-dot", "nul", "backslash", "over-long"])
def test_an_unsafe_checkpoint_id_fails_every_rank_and_writes_nothing(out: Path, cid: str) -> None:
    ex = scenario.example(nodes=1, procs=2)
    before = _tree(out)
    results = worlds.save(ex, str(out), async_save=False, checkpoint_id=cid)
    assert all(isinstance(r, CheckpointError) and set(r.failures) == {0} and "checkpoint_id" in str(r)
               for r in results), results
    after = _tree(out)
    assert after - before <= {"run/checkpoints"}, after - before  # at most the empty parent
    assert not any((out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else True


@pytest.mark.parametrize("where", ["../../outside.safetensors", "/etc/passwd", "model/../../x.safetensors",
                                   "model\\..\\x.safetensors", "model/sub/x.safetensors"])
def test_a_manifest_that_points_a_file_outside_its_checkpoint_is_refused(out: Path, where: str) -> None:
    ex = Example(Topo(1, 1, (0,), (("dp", 1),)), scenario.DECLS[:1], {"model": {"w": 1}})
    path = worlds.ok(worlds.save(ex, str(out), async_save=False))[0]
    m = Path(path) / "manifest.json"
    raw = json.loads(m.read_bytes())
    raw["components"]["model"]["files"][0]["path"] = where
    m.write_text(json.dumps(raw))
    results = worlds.load(ex, str(out), path=path)
    assert all(type(r) is ManifestError and "unsafe file path" in str(r) for r in results), results
    assert not (out.parent / "outside.safetensors").exists() and os.path.exists("/etc/passwd")
