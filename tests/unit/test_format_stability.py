"""The on-disk format is byte-for-byte what it was before issue 13 moved the code around.

The fixture ``tests/data/format-481fced/checkpoint`` was written by
:mod:`tests.format_golden` on main at commit 481fced. A fresh save of the same
content must give the same files with the same bytes, and the same manifest:
byte for byte once its volatile fields (:data:`tests.format_golden.VOLATILE`)
are set to the fixture's values, and those fields present with the same types.
``format_version`` is the current :data:`~distckpt.manifest.FORMAT_VERSION`,
at least the fixture's: a deliberate format change bumps that constant (a
new minor version adds what older readers keep in ``extra``), and everything
else a checkpoint without the new feature holds stays byte for byte the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from distckpt import CheckpointCoordinator
from distckpt.manifest import FORMAT_VERSION
from distckpt.testing import ThreadComm, ThreadWorld, run_threads
from tests import format_golden

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "format-481fced" / "checkpoint"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _with_fixture_volatiles(fresh: bytes, golden: bytes) -> bytes:
    """``fresh`` manifest text with each volatile field's value replaced by the fixture's."""
    new, old = json.loads(fresh), json.loads(golden)
    assert new["format_version"] == FORMAT_VERSION
    assert _version(new["format_version"])[0] == _version(old["format_version"])[0]
    assert _version(new["format_version"]) >= _version(old["format_version"])
    text = fresh.decode("utf-8")
    for field in (*format_golden.VOLATILE, "format_version"):
        assert type(new[field]) is type(old[field]), field
        text = text.replace(f'"{field}": {json.dumps(new[field])}', f'"{field}": {json.dumps(old[field])}', 1)
    return text.encode("utf-8")


def test_a_fresh_save_writes_the_same_files_with_the_same_bytes_as_before_the_split(tmp_path: Path) -> None:
    fresh_root = Path(format_golden.write(str(tmp_path)))
    golden, fresh = _files(FIXTURE), _files(fresh_root)
    assert sorted(fresh) == sorted(golden)
    for name in golden:
        if name != "manifest.json":
            assert fresh[name] == golden[name], f"{name} differs from the fixture"


def test_a_fresh_manifest_is_byte_for_byte_the_fixture_apart_from_timestamp_and_versions(tmp_path: Path) -> None:
    fresh_root = Path(format_golden.write(str(tmp_path)))
    golden = (FIXTURE / "manifest.json").read_bytes()
    fresh = (fresh_root / "manifest.json").read_bytes()
    assert _with_fixture_volatiles(fresh, golden) == golden


def test_the_fixture_written_before_the_split_loads_into_every_rank_of_the_same_world(tmp_path: Path) -> None:
    target = tmp_path / "copy"
    shutil.copytree(FIXTURE, target)

    def rank_main(comm: ThreadComm) -> dict[str, Any]:
        decls = format_golden._components(comm.rank)
        for d in decls:
            d.stateful.load_state_dict(None)
        dp = (comm.rank % 2, comm.rank % 2 + 2)
        CheckpointCoordinator(decls, process_groups={"dp": dp}, dist=comm).load_checkpoint(target)
        return {d.key: d.stateful.state_dict() for d in decls}

    results = run_threads(ThreadWorld(format_golden.WORLD_SIZE, nodes=list(format_golden.NODES)), rank_main)
    for rank, loaded in enumerate(results):
        assert not isinstance(loaded, BaseException), loaded
        expected = format_golden.states(rank)
        assert set(loaded) == set(expected)
        for key, want in expected.items():
            got_leaves, got_spec = tree_flatten(loaded[key])
            want_leaves, want_spec = tree_flatten(want)
            assert got_spec == want_spec, (rank, key)
            for a, b in zip(got_leaves, want_leaves, strict=True):
                if isinstance(b, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), (rank, key)
                else:
                    assert type(a) is type(b) and a == b, (rank, key)
