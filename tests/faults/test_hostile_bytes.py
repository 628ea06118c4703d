"""Hostile bytes: crafted manifests, headers and skeletons never escape as raw exceptions
or unbounded work (issue 11, item 8).

The component files here are forged *with* a matching size and checksum in the
manifest (whoever can write the file can write the manifest), so what is
tested is the parse itself: each one is an :class:`IntegrityError` naming the
file. A hostile manifest is a :class:`ManifestError` naming it, "latest" skips
that checkpoint, and saves go on. The command line says the same without a
traceback.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from distckpt import (
    CheckpointCoordinator,
    CheckpointManifest,
    IntegrityError,
    ManifestError,
    StateComponent,
)
from distckpt.cli import main as cli_main
from distckpt.storage import checksum_of
from distckpt.testing.pool import WorldPool, WorldSpec
from tests.faults import ranks, scenario
from tests.faults.ranks import Fault
from tests.helpers import Box
from tests.property import worlds

pytestmark = pytest.mark.timeout(60)

DEEP = 100_000
GLOO = WorldSpec(nodes=2, procs_per_node=2)
EX = scenario.example()


def _deep(n: int = DEEP) -> str:
    return "[" * n + "]" * n


# ------------------------------------------------------------------ manifests

def _two_checkpoints(tmp_path: Path) -> tuple[str, str]:
    out = str(tmp_path)
    older = worlds.ok(worlds.save(EX, out, generation=0, async_save=False))[0]
    newer = worlds.ok(worlds.save(EX, out, generation=1, async_save=False))[0]
    return older, newer


def _deeply_nested_manifest(manifest: Path) -> None:
    raw = json.loads(manifest.read_bytes())
    raw["components"]["model"]["metadata"] = {"note": "@DEEP@"}
    manifest.write_text(json.dumps(raw).replace('"@DEEP@"', _deep()))


def test_a_manifest_nested_100000_deep_is_a_manifest_error_and_blocks_neither_latest_nor_the_next_save(
        tmp_path: Path) -> None:
    out = str(tmp_path)
    older, newer = _two_checkpoints(tmp_path)
    manifest = Path(newer) / "manifest.json"
    _deeply_nested_manifest(manifest)

    results = worlds.load(EX, out, path=newer)
    assert all(type(r) is ManifestError for r in results), results
    assert str(manifest) in str(results[0]) and "nested" in str(results[0])

    assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == older
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, out))):
        assert report.path == older
        scenario.check_loaded(EX, rank, states, generation=0)
    third = worlds.ok(worlds.save(EX, out, generation=2, async_save=False, checkpoint_id="after"))[0]
    for rank, (report, states) in enumerate(worlds.ok(worlds.load(EX, out))):
        assert report.path == third
        scenario.check_loaded(EX, rank, states, generation=2)


def test_a_manifest_with_an_absurd_sequence_is_refused_and_default_ids_still_work(tmp_path: Path) -> None:
    out = str(tmp_path)
    worlds.ok(worlds.save(EX, out, generation=0, async_save=False))
    newer = worlds.ok(worlds.save(EX, out, generation=1, async_save=False, checkpoint_id="newer"))[0]
    manifest = Path(newer) / "manifest.json"
    raw = json.loads(manifest.read_bytes())
    raw["sequence"] = 10**400
    manifest.write_text(json.dumps(raw))

    with pytest.raises(ManifestError, match="sequence"):
        CheckpointManifest.load(manifest)
    third = worlds.ok(worlds.save(EX, out, generation=2, async_save=False))[0]  # default id: not 10**400 + 1
    assert CheckpointCoordinator([], output_dir=out).latest_checkpoint() == third


def test_latest_skips_a_checkpoint_whose_manifest_fails_for_any_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    older, newer = _two_checkpoints(tmp_path)
    real_load = CheckpointManifest.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[CheckpointManifest], path: Any) -> CheckpointManifest:
        if os.fspath(path).startswith(newer):
            raise MemoryError("not enough memory to parse this manifest")  # not a ManifestError
        result: CheckpointManifest = real_load(cls, path)
        return result

    monkeypatch.setattr(CheckpointManifest, "load", classmethod(load))
    assert CheckpointCoordinator([], output_dir=str(tmp_path)).latest_checkpoint() == older


@pytest.mark.multirank
@pytest.mark.timeout(180)
def test_on_gloo_a_deeply_nested_manifest_blocks_neither_loading_latest_nor_saving(
        world_pool: WorldPool, tmp_path: Path) -> None:
    out = str(tmp_path)

    def on_every_rank(fn: Any, *args: Any) -> list[dict[str, Any]]:
        outcomes = world_pool.run(GLOO, fn, *args, timeout=90)
        assert all(o.ok for o in outcomes), [o.describe() for o in outcomes]
        return [o.value for o in outcomes]

    older = on_every_rank(ranks.save, EX, out, 0, Fault(), "older", ranks.CALM_TIMEOUT)[0]["path"]
    newer = on_every_rank(ranks.save, EX, out, 1, Fault(), "newer", ranks.CALM_TIMEOUT)[0]["path"]
    _deeply_nested_manifest(Path(newer) / "manifest.json")

    loaded = on_every_rank(ranks.load, EX, out, 0)  # latest, checked against generation 0 on every rank
    assert [v.get("path") for v in loaded] == [older] * 4, loaded
    saved = on_every_rank(ranks.save, EX, out, 2, Fault(), "after", ranks.CALM_TIMEOUT)
    assert len({v.get("path") for v in saved}) == 1 and "error" not in saved[0], saved
    loaded = on_every_rank(ranks.load, EX, out, 2)
    assert [v.get("path") for v in loaded] == [saved[0]["path"]] * 4, loaded


def test_the_cli_lists_inspects_and_verifies_a_deeply_nested_manifest_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, newer = _two_checkpoints(tmp_path)
    manifest = Path(newer) / "manifest.json"
    _deeply_nested_manifest(manifest)

    assert cli_main(["ls", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "corrupt" in listing and "nested" in listing and os.path.basename(newer) in listing
    for command in ("inspect", "verify"):
        assert cli_main([command, newer]) == 2
        captured = capsys.readouterr()
        assert str(manifest) in captured.err and "nested" in captured.err, captured.err
        assert "Traceback" not in captured.err + captured.out


FORGED_FIELDS = {
    "a component checksum that is a number": (("components", "model", "checksum"), 7, 2),
    "a world of 10**19 ranks": (("world_size",), 10**19, 1),
    "a group that is a list of numbers": (("topology", "groups"), {"dp": [1]}, 0),
}


@pytest.mark.parametrize("forged", list(FORGED_FIELDS), ids=list(FORGED_FIELDS))
def test_the_cli_inspects_and_verifies_a_manifest_with_a_forged_field_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], forged: str) -> None:
    (where, value, verify_status) = FORGED_FIELDS[forged]
    path = _save_one(tmp_path, "forged")
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_bytes())
    node = raw
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    manifest.write_text(json.dumps(raw))

    assert cli_main(["verify", "-q", path]) == verify_status
    assert cli_main(["inspect", path]) == (2 if verify_status == 2 else 0)  # a refused manifest, or shown
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if verify_status == 2:
        assert str(manifest) in captured.err, captured.err


# ------------------------------------------------------------------ component files

def _safetensors(header: str, data: bytes = b"") -> bytes:
    raw = header.encode()
    raw += b" " * (-(8 + len(raw)) % 16)
    return struct.pack("<Q", len(raw)) + raw + data


def _skeleton_file(skeleton: str, entries: str = "", data: bytes = b"") -> bytes:
    meta = json.dumps({"format": "pt", "distckpt.skeleton": skeleton})
    return _safetensors("{" + f'"__metadata__":{meta}' + (f",{entries}" if entries else "") + "}", data)


def _forge(path: str, data: bytes) -> str:
    """Replace the one file of component "model" by ``data``, manifest updated to match (size and checksum)."""
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_bytes())
    entry = raw["components"]["model"]["files"][0]
    (Path(path) / entry["path"]).write_bytes(data)
    entry["size_bytes"] = len(data)
    entry["checksum"] = checksum_of(data)
    raw["components"]["model"]["size_bytes"] = len(data)
    raw["components"]["model"]["checksum"] = checksum_of(entry["checksum"].encode())
    manifest.write_text(json.dumps(raw))
    return str(Path(path) / entry["path"])


def _save_one(out: Path, checkpoint_id: str) -> str:
    box = Box({"w": torch.arange(4.0), "step": 3})
    return CheckpointCoordinator([StateComponent("model", box, "global")], output_dir=out).save_checkpoint(
        checkpoint_id=checkpoint_id)


def _load_one(out: Path, path: str) -> Any:
    box = Box({"w": torch.zeros(4), "step": 0})
    CheckpointCoordinator([StateComponent("model", box, "global")], output_dir=out).load_checkpoint(path)
    return box.state


HOSTILE = {
    "a header nested 100000 deep": _safetensors('{"x":' + _deep() + "}"),
    "a skeleton nested 100000 deep": _skeleton_file(_deep()),
    "a shape of 1e999": _skeleton_file('{"$tensor":"t0"}', '"t0":{"dtype":"F32","shape":[1e999],"data_offsets":[0,4]}',
                                       b"\0" * 4),
    "a fractional shape": _skeleton_file('{"$tensor":"t0"}', '"t0":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}',
                                         b"\0" * 4),
    "data offsets of 1e999": _skeleton_file('{"$tensor":"t0"}',
                                            '"t0":{"dtype":"F32","shape":[1],"data_offsets":[0,1e999]}', b"\0" * 4),
    "a $float of one byte": _skeleton_file('{"$float":"00"}'),
    "a $dict that is a string": _skeleton_file('{"$dict":"ab"}'),
    "a $dict with a float key": _skeleton_file('{"$dict":[[1.5,1]]}'),
    "an empty $npscalar": _skeleton_file('{"$npscalar":"","dtype":"<f8"}'),
    "a torch.Size of 10**30": _skeleton_file('{"$size":[1000000000000000000000000000000]}'),
    "a raw tensor of 1 GiB with no bytes": _skeleton_file(
        '{"$tensor":"t0","dtype":"float32","shape":[16384,16384]}', '"t0":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'),
}


@pytest.mark.parametrize("forged", list(HOSTILE), ids=list(HOSTILE))
def test_a_forged_component_file_with_a_matching_checksum_is_an_integrity_error_naming_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], forged: str) -> None:
    clean = _save_one(tmp_path, "clean")
    path = _save_one(tmp_path, "forged")
    full = _forge(path, HOSTILE[forged])

    with pytest.raises(IntegrityError) as caught:
        _load_one(tmp_path, path)
    assert type(caught.value) is IntegrityError and full in str(caught.value), str(caught.value)

    assert cli_main(["diff", clean, path]) == 2  # decodes both files
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "forged/model" in captured.err, captured.err


def test_an_unknown_checksum_algorithm_is_an_integrity_error_naming_the_file(tmp_path: Path) -> None:
    path = _save_one(tmp_path, "one")
    manifest = Path(path) / "manifest.json"
    raw = json.loads(manifest.read_bytes())
    entry = raw["components"]["model"]["files"][0]
    entry["checksum"] = "md5:" + entry["checksum"].partition(":")[2]
    manifest.write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="unknown checksum algorithm 'md5'") as caught:
        _load_one(tmp_path, path)
    assert str(Path(path) / entry["path"]) in str(caught.value)


def test_a_state_nested_too_deeply_to_read_back_is_refused_at_save_naming_the_limit(tmp_path: Path) -> None:
    from distckpt import SerializationError

    state: dict[str, Any] = {}
    node = state
    for _ in range(400):
        node["x"] = {}
        node = node["x"]
    coordinator = CheckpointCoordinator([StateComponent("model", Box(state), "global")], output_dir=tmp_path)
    with pytest.raises(SerializationError, match="too deeply"):
        coordinator.save_checkpoint()
    assert coordinator.latest_checkpoint() is None


def test_a_dtype_name_in_a_skeleton_never_imports_a_torch_submodule() -> None:
    """``{"$dtype": "_dynamo"}`` once made the decoder import torch._dynamo (seconds of work, side effects)."""
    import subprocess
    import sys

    program = (
        "import sys, torch\n"
        "from distckpt import codec, IntegrityError\n"
        f"data = bytearray({_skeleton_file(json.dumps({'$dtype': '_dynamo'}))!r})\n"
        "try:\n"
        "    codec.decode(data, where='forged.safetensors')\n"
        "except IntegrityError as exc:\n"
        "    print('refused:', exc)\n"
        "print('imported:', 'torch._dynamo' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "refused: forged.safetensors: unknown torch dtype '_dynamo'" in done.stdout, done.stdout
    assert "imported: False" in done.stdout, done.stdout
