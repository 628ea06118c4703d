"""A malicious pickle where a legacy (original-format) checkpoint file is expected.

The payload's unpickling would create a marker file. Loading must fail on every
rank with a clear error, and the marker must never appear. A control test shows
the payload is live: plain unpickling does create the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from distckpt import IntegrityError
from tests.faults import scenario
from tests.property import worlds
from tests.property.strategies import Decl, Example, decl_files

pytestmark = pytest.mark.timeout(60)


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    marker = ""

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {Payload.marker}",))


def _write_payload(path: Path, fmt: str) -> None:
    state = {"w": torch.ones(2), "evil": Payload()}
    if fmt == "raw-pickle":
        with open(path, "wb") as f:
            pickle.dump(state, f)
    else:
        torch.save(state, path)


#: Legacy file names of a 2 x 2 world (dp x tp mesh, two nodes) for each pattern, all writers.
LEGACY = {
    "global": ["model_state.pt"],
    "per_rank": [f"model_state_rank_{r}.pt" for r in range(4)],
    "per_group": ["model_state_group_dp_grank_0_rank_0.pt", "model_state_group_dp_grank_0_rank_1.pt"],
    "per_node": ["model_state_node_0_rank_0.pt", "model_state_node_1_rank_2.pt"],
}


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    Payload.marker = str(tmp_path / "PWNED")
    return tmp_path / "PWNED"


@pytest.mark.parametrize("fmt", ["raw-pickle", "torch-zip"])
def test_the_payload_is_live_when_unpickled_without_protection(tmp_path: Path, marker: Path, fmt: str) -> None:
    path = tmp_path / "model_state.pt"
    _write_payload(path, fmt)
    assert not marker.exists()
    if fmt == "raw-pickle":
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("with_manifest", [False, True], ids=["no-legacy-manifest", "legacy-manifest"])
@pytest.mark.parametrize("fmt", ["raw-pickle", "torch-zip"])
@pytest.mark.parametrize("pattern", list(LEGACY))
def test_a_malicious_pickle_in_place_of_a_legacy_file_fails_the_load_and_never_runs(
    tmp_path: Path, marker: Path, pattern: str, fmt: str, with_manifest: bool,
) -> None:
    legacy = tmp_path / "checkpoint-500"
    legacy.mkdir()
    for name in LEGACY[pattern]:
        _write_payload(legacy / name, fmt)
    if with_manifest:
        (legacy / "checkpoint_manifest.json").write_text(json.dumps({"checkpoint_id": "500"}))
    ex = scenario.example()
    ex = Example(ex.topo, (Decl("model", pattern, group="dp" if pattern == "per_group" else None),), {})
    # torch's weights_only unpickler warns about the raw pickle's protocol before refusing it:
    # expected, and part of what this test provokes.
    expected = (pytest.warns(UserWarning, match="pickle protocol") if fmt == "raw-pickle"
                else contextlib.nullcontext())
    with expected:
        results = worlds.load(ex, str(tmp_path), path=str(legacy))
    assert all(type(r) is IntegrityError for r in results), results
    assert set(results[0].failures) == {0, 1, 2, 3}
    assert all("weights_only=True" in m and ".pt" in m for m in results[0].failures.values()), results[0].failures
    assert not marker.exists(), "the pickle payload ran"


def test_a_pickle_smuggled_in_as_a_component_file_with_a_matching_manifest_entry_never_runs(
    tmp_path: Path, marker: Path,
) -> None:
    ex = scenario.example()
    path = Path(worlds.ok(worlds.save(ex, str(tmp_path), async_save=False))[0])
    rel = decl_files(ex.decl("trainer"), ex.topo)[0][0]
    _write_payload(path / rel, "raw-pickle")
    data = (path / rel).read_bytes()
    manifest = json.loads((path / "manifest.json").read_bytes())
    entry = manifest["components"]["trainer"]["files"][0]
    entry["size_bytes"], entry["checksum"] = len(data), "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    results = worlds.load(ex, str(tmp_path))
    assert all(type(r) is IntegrityError and rel in str(r) for r in results), results
    assert not marker.exists(), "the pickle payload ran"
