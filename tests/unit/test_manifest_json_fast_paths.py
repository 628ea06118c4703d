"""The manifest's fast JSON paths write and read exactly what the generic walk does."""

from __future__ import annotations

import enum

import pytest

from distckpt import CheckpointManifest, ComponentManifest, FileEntry, ManifestError, SharingPattern
from distckpt.jsontext import dumps


class Rank(enum.IntEnum):
    FIRST = 0


def manifest(files: tuple[FileEntry, ...]) -> CheckpointManifest:
    c = ComponentManifest(key="model", sharing_pattern=SharingPattern.PER_GROUP, group_name="dp",
                          ranks=tuple(sorted({f.writer for f in files})),
                          replicated_across=tuple(f.ranks for f in files), files=files, size_bytes=1,
                          metadata={"nested": {"deep": [[1, 2], [3]], "mixed": [1, "a", [2]]}})
    return CheckpointManifest(checkpoint_id="7", world_size=8, timestamp="t", components={"model": c},
                              topology={"nodes": [[0, 1, 2, 3], [4, 5, 6, 7]], "groups": {"dp": [[0, 4], []]}},
                              extra={"future": [{"a": 1}, []]})


def entry(path: str, ranks: tuple[object, ...], **kw: object) -> FileEntry:
    return FileEntry(path=path, ranks=ranks, writer=kw.pop("writer", 0), size_bytes=5,  # type: ignore[arg-type]
                     checksum='xxh3-128:"q\\u00e9"', **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("files", [
    (),
    (entry("model/a.st", (0, 4)), entry("model/b.st", ())),
    (entry("model/a.st", (0, 4), part=0, parts=2), entry("model/b.st", (0, 4), part=1, parts=2)),
    (entry("model/a.st", (0,), extra={"stripes": {"n": [1, [2]]}}), entry("model/b.st", (1,))),
    (entry("model/a.st", (True, 1)), entry("model/b.st", (Rank.FIRST,), writer=Rank.FIRST)),
    (entry("model/a.st", ("], [", 1)), entry("model/b.st", ([1, 2],))),
    (entry("model/\u00e9.st", (1.5, None)),),
])
def test_manifest_json_is_exactly_the_generic_walk_of_its_dict(files: tuple[FileEntry, ...]) -> None:
    m = manifest(files)
    assert m.to_json() == dumps(m.to_dict()) + "\n"


def test_a_manifest_of_plain_entries_parses_back_to_equal_entries() -> None:
    files = tuple(entry(f"model/f{i}.st", (i, i + 4)) for i in range(4))
    m = manifest(files)
    again = CheckpointManifest.from_json(m.to_json().encode())
    assert again.to_dict() == m.to_dict()
    assert again.components["model"].files == files


@pytest.mark.parametrize(("field", "value", "match"), [
    ("ranks", [0, True], "list of ranks"),
    ("ranks", [0, 1.0], "list of ranks"),
    ("writer", True, "must be an int"),
    ("size_bytes", -1, "negative"),
    ("path", "../x.st", "unsafe file path"),
    ("path", "model/.", "unsafe file path"),
    ("checksum", 3, "checksum"),
])
def test_a_five_field_entry_with_a_bad_value_is_refused_by_name(field: str, value: object, match: str) -> None:
    d = manifest((entry("model/a.st", (0,)),)).to_dict()
    d["components"]["model"]["files"][0][field] = value
    with pytest.raises(ManifestError, match=match):
        CheckpointManifest.from_dict(d)


def test_a_duplicate_key_in_a_file_entry_is_refused() -> None:
    text = manifest((entry("model/a.st", (0,)),)).to_json().replace('"writer": 0', '"writer": 0, "writer": 1')
    with pytest.raises(ManifestError, match="duplicate key 'writer'"):
        CheckpointManifest.from_json(text.encode())
