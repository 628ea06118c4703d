"""An encoded state dict ready to stream, and the text of its safetensors header.

Pure: builds bytes in memory. :class:`EncodedState` is what :func:`.encoder.encode`
returns and what the save path hands, run by run, to
:func:`distckpt.storage.write_runs`; :meth:`EncodedState.split` cuts it into
the part files of a balanced write (the save path, :mod:`distckpt.planning`). ``_header``
writes the length prefix and JSON header byte for byte as ``json.dumps``
would (tests/unit/test_format_stability.py pins those bytes). Bad arguments
raise ``ValueError``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .dtypes import PART_KEY, SKELETON_KEY, tensor_bytes

#: Tensors smaller than this are packed into runs when written (see :meth:`EncodedState.runs`).
PACK_BELOW = 1024 * 1024
#: Largest packed run: a few MiB, copied, hashed and written while still in cache.
RUN_BYTES = 4 * 1024 * 1024
_PACKABLE = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                       torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128})


@dataclass(frozen=True)
class EncodedState:
    """A state dict ready to stream: the safetensors header and the tensors in file order.

    ``names``, ``dtypes`` (safetensors names) and ``skeleton`` describe the
    tensors so that :meth:`split` can build self-contained part files.
    ``private``: the tensors are snapshots this encoding owns (``encode(copy=True)``),
    which nothing else changes, so a writer may hash and write them in place.
    """

    header: bytes
    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    skeleton: str = ""
    private: bool = False
    #: bytes of each tensor (computed when not given)
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.sizes:
            object.__setattr__(self, "sizes", tuple(t.numel() * t.element_size() for t in self.tensors))
        elif len(self.sizes) != len(self.tensors):
            raise ValueError(f"sizes: {len(self.sizes)} for {len(self.tensors)} tensors")

    @property
    def total_size(self) -> int:
        """Exact size in bytes of the file these chunks make."""
        return len(self.header) + sum(self.sizes)

    def chunks(self) -> Iterator[memoryview]:
        """The file's bytes, header first, without copying tensor data."""
        yield memoryview(self.header)
        for t, size in zip(self.tensors, self.sizes, strict=True):
            if size:
                yield tensor_bytes(t)

    def runs(self) -> Iterator[tuple[memoryview, bool] | tuple[list[torch.Tensor], int]]:
        """The file's bytes for :func:`distckpt.storage.write_runs`, in order.

        ``(view, True)``: a private copy nothing else changes (the header, a
        private encoding's snapshots); ``(view, False)``: a large tensor's bytes,
        which the writer copies before hashing; ``(tensors, nbytes)``: a run of
        small tensors of one dtype, at most :data:`RUN_BYTES` together, which the
        writer copies back to back with one call (one copy, hash and write per
        run instead of per tensor).
        """
        yield memoryview(self.header), True
        if self.private:
            for t, size in zip(self.tensors, self.sizes, strict=True):
                if size:
                    yield tensor_bytes(t), True
            return
        run: list[torch.Tensor] = []
        run_bytes = 0
        run_dtype: torch.dtype | None = None
        for t, size in zip(self.tensors, self.sizes, strict=True):
            if not size:
                continue
            if size >= PACK_BELOW or t.dtype not in _PACKABLE:
                if run:
                    yield run, run_bytes
                    run, run_bytes = [], 0
                yield tensor_bytes(t), False
                continue
            if run and (t.dtype is not run_dtype or run_bytes + size > RUN_BYTES):
                yield run, run_bytes
                run, run_bytes = [], 0
            run.append(t)
            run_bytes += size
            run_dtype = t.dtype
        if run:
            yield run, run_bytes

    def to_bytes(self) -> bytes:
        """The whole file in memory (tests and small states)."""
        return b"".join(bytes(c) for c in self.chunks())

    def split(self, parts: int) -> tuple[EncodedState, ...]:
        """The same state as ``parts`` self-contained safetensors files (balanced writes).

        Tensors keep their file order and go to the part their first byte falls
        in when the tensor bytes are cut into ``parts`` equal ranges; part 0
        also carries the skeleton. Deterministic: replicas that encode to the
        same header split identically. :func:`assemble` joins the parts again.
        """
        if parts < 1:
            raise ValueError(f"parts: expected a positive int, got {parts}")
        if parts == 1:
            return (self,)
        sizes = self.sizes
        total = sum(sizes)
        groups: list[list[int]] = [[] for _ in range(parts)]
        before = 0
        for i, size in enumerate(sizes):
            groups[min(parts - 1, before * parts // total) if total else 0].append(i)
            before += size
        out = []
        for index, members in enumerate(groups):
            meta = {"format": "pt", PART_KEY: f"{index}/{parts}"}
            if index == 0:
                meta[SKELETON_KEY] = self.skeleton
            tensors = [self.tensors[i] for i in members]
            names = [self.names[i] for i in members]
            dtypes = [self.dtypes[i] for i in members]
            part_sizes = [self.sizes[i] for i in members]
            out.append(EncodedState(header=_header(meta, names, dtypes, tensors, part_sizes), tensors=tuple(tensors),
                                    names=tuple(names), dtypes=tuple(dtypes),
                                    skeleton=self.skeleton if index == 0 else "", private=self.private,
                                    sizes=tuple(part_sizes)))
        return tuple(out)


def _header(meta: dict[str, str], names: Sequence[str], dtypes: Sequence[str], tensors: Sequence[torch.Tensor],
            sizes: Sequence[int] | None = None) -> bytes:
    """Length prefix plus JSON header, padded so that tensor data starts 16-aligned.

    The text is exactly ``json.dumps({"__metadata__": meta, name: {"dtype", "shape",
    "data_offsets"}, ...}, separators=(",", ":"))``, built without a dict per tensor
    (names are ``t<k>``, dtypes safetensors names: nothing to escape).
    """
    pieces = ['{"__metadata__":', json.dumps(meta, separators=(",", ":"))]
    append = pieces.append
    offset = 0
    if sizes is None:
        sizes = [t.numel() * t.element_size() for t in tensors]
    for name, st, data, size in zip(names, dtypes, tensors, sizes, strict=True):
        shape = data.shape
        dims = str(shape[0]) if len(shape) == 1 else ",".join(map(str, shape))
        end = offset + size
        append(f',"{name}":{{"dtype":"{st}","shape":[{dims}],"data_offsets":[{offset},{end}]}}')
        offset = end
    append("}")
    header = "".join(pieces).encode("utf-8")
    header += b" " * (-(8 + len(header)) % 16)
    return struct.pack("<Q", len(header)) + header

