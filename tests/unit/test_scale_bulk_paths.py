"""The bulk paths of the plan phase and the manifest give what the one-object-at-a-time paths gave.

At 65,536 ranks the plan, the manifest build and the manifest parse make
some 75,000 entries each; they are made by C code (``map`` over columns)
instead of a Python call per entry (:meth:`FileEntry._many`,
:meth:`FilePlan._wholes`), set keys are hashed from one buffer
(``topology._label_groups``), and ranks listed in order skip the sort of
:func:`check_partition`. Each test compares with the plain constructor or the
plain function, so a wrong fast path fails here.
"""

from __future__ import annotations

import copy
import json
import pickle
import random
from collections.abc import Sequence
from dataclasses import fields, replace

import numpy as np
import pytest

from distckpt import (
    CheckpointManifest,
    ComponentManifest,
    FileEntry,
    ManifestError,
    StateComponent,
    Topology,
)
from distckpt.layout import FilePlan, plan_component
from distckpt.patterns import PerRank
from distckpt.planning import SavePlan, build_manifest
from distckpt.topology import _label_groups, _normalise, check_partition, group_key
from tests.helpers import Box


@pytest.mark.parametrize("parts", [None, [(0, 2), (1, 2), (0, 1)]])
def test_entries_made_from_columns_equal_entries_made_one_by_one_and_share_nothing_mutable(
        parts: list[tuple[int, int]] | None) -> None:
    paths, ranks = ["k/a.st", "k/b.st", "k/c.st"], [(0, 1), (0, 1), (2,)]
    writers, sizes, checksums = [0, 1, 2], [10, 11, 12], ["x:1", "x:2", "x:3"]
    made = FileEntry._many(paths, ranks, writers, sizes, checksums, parts)
    pairs = parts or [(0, 1)] * 3
    expected = tuple(FileEntry(p, r, w, s, c, part=i, parts=n)
                     for p, r, w, s, c, (i, n) in zip(paths, ranks, writers, sizes, checksums, pairs, strict=True))
    assert made == expected
    assert [e.to_dict() for e in made] == [e.to_dict() for e in expected]
    assert made[0].extra == {} and made[0].extra is not made[1].extra  # no dict shared between entries
    assert [values(e) for e in made] == [values(x) for x in expected] and {type(e) for e in made} == {FileEntry}
    assert pickle.loads(pickle.dumps(made)) == expected  # slots: pickled and copied like the dataclass was
    assert copy.deepcopy(made) == expected and replace(made[0], writer=7).writer == 7


def values(obj: object) -> list[object]:
    return [getattr(obj, f.name) for f in fields(obj)]  # type: ignore[arg-type]


def test_whole_file_plans_made_from_columns_equal_plans_made_one_by_one() -> None:
    partition = ((0, 3), (1,), (2, 4, 5))
    made = FilePlan._wholes(["k/a.st", "k/b.st", "k/c.st"], partition)
    assert made == tuple(FilePlan(path=p, ranks=s, writer=s[0]) for p, s in
                         zip(["k/a.st", "k/b.st", "k/c.st"], partition, strict=True))
    assert [values(m) for m in made] == [[m.path, m.ranks, m.ranks[0], 0, 1] for m in made]
    assert pickle.loads(pickle.dumps(made)) == made


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_set_keys_hashed_from_one_buffer_equal_group_key_of_each_set(seed: int) -> None:
    rng = random.Random(seed)
    labels = np.array([rng.randrange(9) for _ in range(200)], dtype=np.int64)
    sets, member_of, keys = _label_groups(labels, keyed=True)
    assert keys.tolist() == [group_key(s) for s in sets]
    assert sets == _normalise([[r for r in range(200) if labels[r] == v] for v in set(labels.tolist())])
    assert all(r in sets[member_of[r]] for r in range(200))


@pytest.mark.parametrize("sets", [
    [(0,), (1,), (2,), (3,)],  # in order: the sort is skipped
    [[0, 1], [2, 3]],
    [(2, 3), (0, 1)],  # not in order: sorted as before
    [(1, 0), (3, 2)],
    [(0, 2), (1, 3)],
])
def test_a_partition_listed_in_rank_order_comes_back_as_the_sorted_partition(sets: list[tuple[int, ...]]) -> None:
    assert check_partition(sets, 4, "x") == _normalise(sets)
    assert all(type(s) is tuple for s in check_partition(sets, 4, "x"))


@pytest.mark.parametrize("sets", [[(0,), (), (1, 2, 3)], [(0, 1), (1, 2, 3)], [(0, 1, 2)], [(0, True), (2, 3)]])
def test_a_partition_in_order_but_broken_is_still_refused(sets: list[tuple[int, ...]]) -> None:
    with pytest.raises(Exception, match="x:"):
        check_partition(sets, 4, "x")


@pytest.mark.parametrize("min_part_bytes", [None, 100])
def test_a_manifest_built_from_columns_equals_the_entries_of_the_plan_and_records(min_part_bytes: int | None) -> None:
    topo = Topology(nodes=[[0, 1], [2, 3]], groups={"dp": [[0, 2], [1, 3]]})
    decl = [StateComponent("model", Box({}), "per_group", process_group_name="dp"),
            StateComponent("rng", Box({}), "per_rank")]
    plans = {c.key: plan_component(topo, c.key, c.pattern, sizes={0: 250, 1: 250, 2: 0, 3: 0},
                                   min_part_bytes=min_part_bytes) for c in decl}
    assert (max(f.parts for f in plans["model"].files) > 1) is (min_part_bytes is not None)
    records = {key: {f.path: (100 + i, f"x:{key}{i}", f.writer + 10 * i, "") for i, f in enumerate(p.files)}
               for key, p in plans.items()}
    plan = SavePlan(path="/c", staging="/s", checkpoint_id="1", sequence=1, timestamp="t", topology=topo,
                    components=plans)
    manifest = build_manifest(plan, decl, records, {})
    for key, cplan in plans.items():
        expected = tuple(FileEntry(f.path, f.ranks, records[key][f.path][2], records[key][f.path][0],
                                   records[key][f.path][1], part=f.part, parts=f.parts) for f in cplan.files)
        assert manifest.components[key].files == expected
        assert manifest.components[key].size_bytes == sum(e.size_bytes for e in expected)
        assert manifest.components[key].replicated_across == tuple(dict.fromkeys(f.ranks for f in cplan.files))
    assert CheckpointManifest.from_json(manifest.to_json().encode()) == manifest


def test_a_table_listing_one_replica_set_for_two_whole_files_is_refused() -> None:
    n = 1024
    files = tuple(FileEntry(f"rng/rank-{i:05d}.st", (i,), i, 5, "x:1") for i in range(n))
    c = ComponentManifest(key="rng", sharing_pattern="per_rank", group_name=None, ranks=tuple(range(n)),
                          replicated_across=tuple(f.ranks for f in files), files=files, size_bytes=5 * n)
    raw = json.loads(CheckpointManifest(checkpoint_id="1", world_size=n, timestamp="t", components={"rng": c},
                                        topology={"nodes": [list(range(n))], "groups": {}}).to_json())
    assert CheckpointManifest.from_json(json.dumps(raw).encode()).components["rng"].files == files
    raw["components"]["rng"]["file_table"]["ranks"] = [[i] for i in range(n - 1)] + [[0]]  # two files of set [0]
    with pytest.raises(ManifestError, match=r"replica set \[0\] has files"):
        CheckpointManifest.from_json(json.dumps(raw).encode())


class NamedRanks(PerRank):
    """A PER_RANK whose files are named otherwise: its own file_stem must be called."""

    def file_stem(self, index: int, members: Sequence[int]) -> str:
        return f"r{members[0]}"


@pytest.mark.parametrize("pattern", [PerRank(), NamedRanks()])
def test_per_rank_file_names_made_at_once_are_the_names_file_stem_gives(pattern: PerRank) -> None:
    topo = Topology(nodes=[list(range(0, 1100)), list(range(1100, 2100))])
    plan = plan_component(topo, "rng", pattern)
    assert [f.path for f in plan.files] == [f"rng/{pattern.file_stem(r, (r,))}.safetensors" for r in range(2100)]
    assert plan.files[1500].path == ("rng/rank-01500.safetensors" if type(pattern) is PerRank else "rng/r1500.safetensors")
