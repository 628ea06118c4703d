"""Format 1.4: a component of many files lists them as a ``file_table`` of columns.

Small components stay one JSON object per file, byte for byte what 1.3 wrote
(``test_format_stability`` holds the fixture); 1.3 manifests of any size,
tables never, still load; a hostile table names itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointManifest,
    ComponentManifest,
    FileEntry,
    ManifestError,
    jsontext,
)
from distckpt.manifest import FORMAT_VERSION, TABLE_VERSION
from distckpt.testing import ThreadComm, ThreadWorld, run_threads
from tests.helpers import Box

N = jsontext.TABLE_MIN_FILES


def manifest(files: int, parts: bool = False, extra: bool = False) -> CheckpointManifest:
    entries = []
    for i in range(files):
        part = {"part": i % 2, "parts": 2} if parts else {}
        name = f"rank-{i // 2:05d}-p{i % 2}" if parts else f"rank-{i:05d}"
        entries.append(FileEntry(path=f"rng/{name}.st",
                                 ranks=(i // 2,) if parts else (i,), writer=i, size_bytes=1000 + i,
                                 checksum=f"xxh3-128:{i:032x}", extra={"future": i} if extra and i == 3 else {},
                                 **part))  # type: ignore[arg-type]
    sets = tuple(dict.fromkeys(e.ranks for e in entries))
    c = ComponentManifest(key="rng", sharing_pattern="per_rank", group_name=None,
                          ranks=tuple(e.writer for e in entries), replicated_across=sets, files=tuple(entries),
                          size_bytes=sum(e.size_bytes for e in entries))
    small = ComponentManifest(key="opt", sharing_pattern="replicated", group_name=None, ranks=(0,),
                              replicated_across=((0,),), files=(FileEntry("opt/replicated.st", (0,), 0, 5, "x"),))
    world = len(sets)
    return CheckpointManifest(checkpoint_id="1", world_size=world, timestamp="t", components={"rng": c, "opt": small},
                              topology={"nodes": [list(range(world))], "groups": {}})


@pytest.mark.parametrize("parts", [False, True])
def test_a_component_of_many_files_is_written_as_a_table_and_reads_back_to_equal_entries(parts: bool) -> None:
    m = manifest(N * 2 if parts else N, parts=parts)
    text = m.to_json()
    raw = json.loads(text)
    assert raw["format_version"] == TABLE_VERSION
    assert "files" not in raw["components"]["rng"] and "file_table" in raw["components"]["rng"]
    assert ("part" in raw["components"]["rng"]["file_table"]) is parts
    assert "files" in raw["components"]["opt"]  # a small component of the same manifest stays as it was
    again = CheckpointManifest.from_json(text.encode())
    assert again.components == m.components and again.topology == m.topology
    assert again.components["rng"].files_for_rank(N - 1) == m.components["rng"].files_for_rank(N - 1)
    assert again.to_json() == text


def test_just_below_the_threshold_nothing_changes_from_format_1_3() -> None:
    m = manifest(N - 1)
    text = m.to_json()
    assert json.loads(text)["format_version"] == FORMAT_VERSION == "1.3"
    assert text == jsontext.dumps(m.to_dict()) + "\n"


def test_entries_with_fields_of_a_newer_version_keep_their_objects_so_nothing_is_lost() -> None:
    m = manifest(N, extra=True)
    raw = json.loads(m.to_json())
    assert "file_table" not in raw["components"]["rng"] and raw["format_version"] == FORMAT_VERSION
    assert CheckpointManifest.from_json(m.to_json().encode()).components["rng"].files[3].extra == {"future": 3}


def test_a_1_3_manifest_of_many_files_listed_one_object_each_still_loads() -> None:
    m = manifest(N + 5)
    old = jsontext.dumps({**m.to_dict(), "format_version": "1.3"}) + "\n"  # what 1.3 wrote
    again = CheckpointManifest.from_json(old.encode())
    assert again.components == m.components and again.format_version == "1.3"


def _table_manifest() -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(manifest(N).to_json())
    assert "ranks" not in raw["components"]["rng"]["file_table"]  # one file per set: the sets say it
    raw["components"]["rng"]["file_table"]["ranks"] = [[i] for i in range(N)]  # a table may list them anyway
    return raw


@pytest.mark.parametrize(("change", "match"), [
    (lambda t: t["path"].pop(), "has 1024 values for 1023 paths"),
    (lambda t: t["path"].__setitem__(7, "../escape.st"), r"file_table.path\[7\]: unsafe file path"),
    (lambda t: t["path"].__setitem__(7, "rng/a.st\nrng/b.st"), r"file_table.path\[7\]: unsafe file path"),
    (lambda t: t["path"].__setitem__(7, 5), "path must hold strings"),
    (lambda t: t["ranks"].__setitem__(2, [True]), "lists of ranks"),
    (lambda t: t["ranks"].__setitem__(2, 3), "lists of ranks"),
    (lambda t: t["writer"].__setitem__(2, 1.5), "writer must hold ints"),
    (lambda t: t["size_bytes"].__setitem__(9, -1), r"size_bytes\[9\] is negative"),
    (lambda t: t["checksum"].__setitem__(2, None), "checksum must hold strings"),
    (lambda t: t.__setitem__("part", [[0, 1]] * 1023 + [[2, 2]]), "index, count"),
    (lambda t: t.__setitem__("stripes", [1] * 1024), "columns this version does not know"),
    (lambda t: t.pop("checksum"), "checksum must be a list"),
])
def test_a_hostile_file_table_is_refused_naming_the_manifest_and_the_column(change: Any, match: str) -> None:
    raw = _table_manifest()
    change(raw["components"]["rng"]["file_table"])
    with pytest.raises(ManifestError, match=match) as info:
        CheckpointManifest.from_json(json.dumps(raw).encode(), where="/ckpt/manifest.json")
    assert "/ckpt/manifest.json: components.rng" in str(info.value)


def test_a_table_without_ranks_needs_one_replica_set_per_file() -> None:
    raw = json.loads(manifest(N).to_json())
    raw["components"]["rng"]["replicated_across"].pop()
    with pytest.raises(ManifestError, match="no ranks column and replicated_across lists 1023 sets"):
        CheckpointManifest.from_json(json.dumps(raw).encode())


def test_files_and_a_file_table_together_are_refused() -> None:
    raw = _table_manifest()
    raw["components"]["rng"]["files"] = []
    with pytest.raises(ManifestError, match="both files and file_table"):
        CheckpointManifest.from_json(json.dumps(raw).encode())


@pytest.mark.timeout(120)
def test_a_save_whose_manifest_holds_tables_loads_back_on_every_rank(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jsontext, "TABLE_MIN_FILES", 2)  # a table from two files on: a world of 4 shows it

    def rank_main(comm: ThreadComm) -> Any:
        box = Box({"w": torch.full((3,), float(comm.rank))})
        from distckpt import StateComponent
        decl = [StateComponent("rng", box, "per_rank"), StateComponent("model", Box({"v": torch.ones(2)}), "replicated")]
        c = CheckpointCoordinator(decl, dist=comm, output_dir=str(tmp_path))
        c.save_checkpoint(checkpoint_id="t")
        box.load_state_dict({"w": torch.zeros(3)})
        c.load_checkpoint()
        return box.state_dict()["w"].tolist()

    results = run_threads(ThreadWorld(4), rank_main)
    assert results == [[float(r)] * 3 for r in range(4)]
    raw = json.loads((tmp_path / "checkpoints" / "checkpoint-t" / "manifest.json").read_text())
    assert raw["format_version"] == TABLE_VERSION and "file_table" in raw["components"]["rng"]
