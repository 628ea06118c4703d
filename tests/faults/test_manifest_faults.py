"""Damaged manifests: each is a ManifestError naming its path, and "latest" skips it.

Two checkpoints are saved (generation 0, then 1); the newer one's manifest is
damaged. Loading it by path fails on every rank with a :class:`ManifestError`
that names the manifest; loading "latest" falls back to the older checkpoint and
restores it bit-exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from distckpt import CheckpointCoordinator, ManifestError
from distckpt.manifest import MAX_MANIFEST_BYTES
from tests.faults import scenario
from tests.property import worlds

pytestmark = pytest.mark.timeout(60)

EX = scenario.example()


def _check(tmp_path: Path, damage: Callable[[Path], None], says: str) -> None:
    out = str(tmp_path)
    older = worlds.ok(worlds.save(EX, out, generation=0, async_save=False))[0]
    newer = worlds.ok(worlds.save(EX, out, generation=1, async_save=False))[0]
    manifest = Path(newer) / "manifest.json"
    damage(manifest)

    results = worlds.load(EX, out, path=newer)
    assert all(type(r) is ManifestError for r in results), results
    assert len({str(r) for r in results}) == 1
    assert str(manifest) in str(results[0]) and says in str(results[0]), str(results[0])

    assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == older
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, out))):
        assert report.path == older
        scenario.check_loaded(EX, rank, states, generation=0)


def test_a_truncated_manifest_is_a_manifest_error_naming_it_and_latest_skips_it(tmp_path: Path) -> None:
    _check(tmp_path, lambda m: os.truncate(m, m.stat().st_size // 2), "not valid JSON")


def test_a_manifest_with_invalid_utf8_is_a_manifest_error_naming_it_and_latest_skips_it(tmp_path: Path) -> None:
    def damage(m: Path) -> None:
        data = m.read_bytes()
        m.write_bytes(data.replace(b'"timestamp": "', b'"timestamp": "\xff\xfe', 1))

    _check(tmp_path, damage, "not valid UTF-8")


def test_a_manifest_with_duplicate_json_keys_is_a_manifest_error_naming_it_and_latest_skips_it(tmp_path: Path) -> None:
    def damage(m: Path) -> None:
        data = m.read_bytes()
        assert data.startswith(b"{")
        m.write_bytes(b'{"sequence": 999,' + data[1:])  # a second "sequence" further down

    _check(tmp_path, damage, "duplicate key 'sequence'")


def test_a_manifest_of_an_unknown_format_version_is_a_manifest_error_naming_it_and_latest_skips_it(tmp_path: Path) -> None:
    def damage(m: Path) -> None:
        raw = json.loads(m.read_bytes())
        raw["format_version"] = "2.0"
        m.write_text(json.dumps(raw))

    _check(tmp_path, damage, "format version 2.0")


def test_an_oversized_manifest_is_a_manifest_error_naming_it_and_latest_skips_it(tmp_path: Path) -> None:
    def damage(m: Path) -> None:
        with open(m, "r+b") as f:  # sparse: costs no disk
            f.truncate(MAX_MANIFEST_BYTES + 1)

    _check(tmp_path, damage, "limit")


def test_a_manifest_of_a_newer_minor_version_with_unknown_fields_still_loads(tmp_path: Path) -> None:
    """The counterpart: unknown fields from a newer *minor* version are not fatal (DESIGN.md §2)."""
    out = str(tmp_path)
    path = worlds.ok(worlds.save(EX, out, async_save=False))[0]
    m = Path(path) / "manifest.json"
    raw = json.loads(m.read_bytes())
    raw["format_version"] = "1.9"
    raw["future_field"] = {"x": 1}
    raw["components"]["model"]["future_component_field"] = [1, 2]
    raw["components"]["model"]["files"][0]["future_file_field"] = "y"
    m.write_text(json.dumps(raw))
    assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == path
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, out))):
        assert report.path == path
        scenario.check_loaded(EX, rank, states)
