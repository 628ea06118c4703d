from __future__ import annotations

import json
from pathlib import Path

import pytest

from distckpt import CheckpointManifest, ComponentManifest, FileEntry, ManifestError, SharingPattern


def sample() -> CheckpointManifest:
    f = FileEntry(path="model/dp-000.safetensors", ranks=(0, 4), writer=0, size_bytes=120, checksum="xxh3-128:00")
    c = ComponentManifest(key="model", sharing_pattern=SharingPattern.PER_GROUP, group_name="dp", ranks=(0,),
                          replicated_across=((0, 4),), files=(f,), validation="tensor", size_bytes=120)
    return CheckpointManifest(checkpoint_id="7", world_size=8, timestamp="2026-01-01T00:00:00Z",
                              components={"model": c}, topology={"nodes": [[0, 1, 2, 3], [4, 5, 6, 7]], "groups": {}},
                              sequence=3)


def test_manifest_round_trips_through_json() -> None:
    m = sample()
    again = CheckpointManifest.from_json(m.to_json().encode())
    assert again.to_dict() == m.to_dict()
    assert again.components["model"].file_for_rank(4).path == "model/dp-000.safetensors"


def test_unknown_fields_from_a_newer_minor_version_survive_a_round_trip() -> None:
    d = sample().to_dict()
    d["format_version"] = "1.7"
    d["future"] = {"x": 1}
    d["components"]["model"]["shiny"] = True
    d["components"]["model"]["files"][0]["stripes"] = 4
    again = CheckpointManifest.from_dict(d).to_dict()
    assert again["future"] == {"x": 1}
    assert again["components"]["model"]["shiny"] is True
    assert again["components"]["model"]["files"][0]["stripes"] == 4


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"format": "distckpt", "format_version": "1.0"', "not valid JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b'{"format": "distckpt", "format": "distckpt"}', "duplicate key"),
        (b'{"format": "other"}', "not a distckpt manifest"),
        (b"[]", "JSON object"),
        (b'{"x": NaN}', "NaN"),
    ],
)
def test_malformed_manifests_raise_manifest_error_naming_the_source(data: bytes, match: str) -> None:
    with pytest.raises(ManifestError, match=match) as info:
        CheckpointManifest.from_json(data, where="somewhere/manifest.json")
    assert "somewhere/manifest.json" in str(info.value)


def test_an_unknown_major_version_is_refused_with_advice() -> None:
    d = sample().to_dict()
    d["format_version"] = "2.0"
    with pytest.raises(ManifestError, match="upgrade distckpt"):
        CheckpointManifest.from_dict(d)


def test_a_manifest_path_escaping_the_checkpoint_is_refused() -> None:
    d = sample().to_dict()
    d["components"]["model"]["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(ManifestError, match="unsafe"):
        CheckpointManifest.from_dict(d)


def test_an_oversized_manifest_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import distckpt.manifest as manifest_mod
    import distckpt.storage as storage_mod

    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", 100)
    monkeypatch.setattr(storage_mod, "MAX_MANIFEST_BYTES", 100)
    path = tmp_path / "manifest.json"
    path.write_text(sample().to_json())
    with pytest.raises(ManifestError, match="limit"):
        CheckpointManifest.load(path)


def test_save_and_load_go_through_a_directory(tmp_path: Path) -> None:
    sample().save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["checkpoint_id"] == "7"
    assert CheckpointManifest.load(tmp_path).sequence == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
