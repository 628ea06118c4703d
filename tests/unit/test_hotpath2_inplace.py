"""The in-place read's file order (targets back to back, or with scratch-buffer gaps between them)
and the decoder taking a wholly in-place file at once: every value lands, a name twice is refused."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distckpt import codec


def _entry(tmp_path: Any, state: Any) -> Any:
    from distckpt import hashing
    from distckpt.manifest import FileEntry

    data = codec.encode(state).to_bytes()
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / "f.safetensors").write_bytes(data)
    return FileEntry(path="c/f.safetensors", ranks=(0,), writer=0, size_bytes=len(data),
                     checksum=hashing.checksum_of(data))


@pytest.mark.parametrize("gap", ["none", "first", "middle", "last", "every-other"])
def test_every_value_lands_whether_the_in_place_targets_lie_back_to_back_or_not(tmp_path: Any, gap: str) -> None:
    from distckpt.reading import read_component

    saved = {f"t{i}": torch.full((3 + i % 2,), float(i)) for i in range(40)}
    live = {k: torch.zeros_like(v) for k, v in saved.items()}
    keep = {"none": [], "first": [0], "middle": [17], "last": [39], "every-other": list(range(0, 40, 2))}[gap]
    for i in keep:  # another dtype: read into the scratch buffer, not in place
        live[f"t{i}"] = live[f"t{i}"].double()
    before = dict(live)
    state = read_component(str(tmp_path), [_entry(tmp_path, saved)], live)
    for k, v in saved.items():
        assert torch.equal(state[k].double(), v.double()), k
        assert (state[k] is before[k]) == (int(k[1:]) not in keep), k  # in place unless its dtype differs


def test_a_tensor_in_two_parts_is_refused_even_when_every_entry_was_read_in_place() -> None:
    from distckpt.errors import IntegrityError

    layout = codec.FileLayout(data_start=0, names=("a", "b"), dtypes=(torch.float32,) * 2, shapes=((1,),) * 2,
                              begins=(0, 4), ends=(4, 8), skeleton=None)
    other = codec.FileLayout(data_start=0, names=("b",), dtypes=(torch.float32,), shapes=((1,),),
                             begins=(0,), ends=(4,), skeleton=None)
    overrides = {"a": torch.ones(1), "b": torch.ones(1)}
    buffer = memoryview(bytearray(8))
    assert codec.assemble([(layout, buffer)], overrides) == overrides
    with pytest.raises(IntegrityError, match="'b' appears twice"):
        codec.assemble([(layout, buffer), (other, buffer)], overrides)
