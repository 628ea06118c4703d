"""A private host copy of a state dict: the snapshot an asynchronous save writes from.

Called by :func:`distckpt.asyncsave.snapshot` on the caller's thread of
``save_checkpoint(async_save=True)``. :class:`StateCopy` walks a state once,
rebuilding its containers and replacing every tensor by a host tensor of the
same dtype and shape (kept from the previous snapshot when they still match,
else allocated): by the bulk path (:mod:`distckpt.hostwalk`: a lean walk, the
checks on columns) when the state is plain, else tensor by tensor.
:meth:`StateCopy.fill` then copies the tensor data (large contiguous tensors
in byte chunks, the rest in batched ``copy_`` calls, both shared by two
threads). Encoding (the skeleton and the safetensors header) is left to the
background thread, which encodes the copy exactly as a synchronous save
encodes the live state: the copy holds the same tensors (contiguous, conjugate
and negative bits resolved) under the same aliasing, so the files are the same.

A DTensor (FSDP2, tensor parallel) is copied as its local shard, with its
layout read at the walk (:class:`~distckpt.dtensor.HostShard`, which the
encoder stores as it stores the DTensor).

Pure: no I/O, no collectives. A state this walk does not know (another tensor
subclass, a container subclass, any other object, or one
nested too deeply) raises :class:`Unsupported`; the caller then snapshots the
old way (:func:`distckpt.saving.encoder`), which also names the bad path.
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Collection, MutableMapping
from functools import partial
from itertools import accumulate, compress, pairwise
from typing import Any

import numpy as np
import torch

from . import dtensor as _dtensor
from .codec.dtypes import flat_bytes, gc_paused
from .hostwalk import IMMUTABLE, Columns, Irregular, Kept, Walk, columns

__all__ = ["Kept", "StateCopy", "Unsupported"]

#: Contiguous CPU tensors of at least this many bytes are copied in chunks of :data:`_CHUNK` bytes
#: by two threads; smaller ones (and any other) in one batched ``copy_``.
_LARGE = 1024 * 1024
_CHUNK = 8 * 1024 * 1024
#: CPUs this process may run on: with two or more, a helper thread copies next to the caller's. Not
#: torch's intra-op thread count: ranks often set that to 1, and the helper only works while the
#: caller's thread waits for the copy.
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_STRIDED = torch.strided
_IMMUTABLE = IMMUTABLE
_data_ptr = torch.Tensor.data_ptr


class Unsupported(Exception):
    """The state holds something :class:`StateCopy` does not copy; snapshot it the general way."""


class StateCopy:
    """One component's state with every tensor replaced by a private host tensor.

    ``state``: the copy (same containers, keys and leaves; each tensor a host
    tensor of the same dtype and shape, contiguous). Its tensors hold
    undefined bytes until :meth:`fill`. Two tensors of the live state that are
    the same view (same data pointer, dtype, shape, strides, conjugate and
    negative bits) become one tensor of the copy, as the encoder aliases them.
    ``reuse`` maps tensor ordinals to the host tensors of the previous copy of
    this component; it is updated to this copy's (a :class:`Kept` also keeps
    the bulk path's columns). ``bulk=False`` takes the per-tensor path only
    (the tests compare the two). Raises :class:`Unsupported`.
    """

    def __init__(self, state: Any, reuse: MutableMapping[int, torch.Tensor] | None = None,
                 bulk: bool = True) -> None:
        self.sources: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.nbytes = 0
        self.plain_nbytes = False  # all plain, none aliased or in _metadata: nbytes == codec.state_nbytes
        self._fresh: list[int] = []  # indices of targets that still need storage
        # per target: whether the source is large and its bytes can be copied as they lie (a
        # contiguous CPU tensor, no lazy conjugate or negative bit): copied in chunks by two threads
        self._plain: list[bool] = []
        self._sizes: list[int] = []  # per target: its bytes
        self._cpu = True  # every source is a CPU tensor
        self._reuse = reuse if reuse is not None else Kept()
        self._columns: tuple[list[torch.Tensor], Columns] | None = None  # for the Kept, once allocated
        self._versions: list[int] | None = None  # the sources' version counters, once watched
        self._counted: dict[int, Any] = {}  # source index -> the DTensor whose counter tells its changes
        # the views copied so far: the first at each address (source, target), then any others by full key
        self._seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._others: dict[tuple[Any, ...], torch.Tensor] = {}
        try:
            with gc_paused():
                self.state = self._bulk(state) if bulk else self._general(state)
        except RecursionError:
            raise Unsupported("nested too deeply") from None
        del self._seen, self._others

    # ------------------------------------------------------------------ the bulk path

    def _bulk(self, state: Any) -> Any:
        """The copy by one lean walk (:class:`~distckpt.hostwalk.Walk`) and the tensors' checks
        and buffers on columns when all are plain; else each tensor as the per-tensor walk does
        (:meth:`_tensor`, in the same order), or the whole per-tensor walk for a state the lean
        one leaves to it. The copy is the same either way."""
        walk = Walk()
        try:
            skeleton = walk.copy(state)
        except (Irregular, RecursionError):
            return self._general(state)
        leaves = walk.leaves
        cols = columns(leaves)
        kept = self._reuse
        if cols is None:
            if isinstance(kept, Kept):
                kept.columns = None
            walk.fill(list(map(self._tensor, leaves)))
            return skeleton
        targets = kept.reusable(cols) if isinstance(kept, Kept) else None
        if targets is None:
            targets = []
            get = kept.get
            for index, (dtype, shape) in enumerate(zip(cols.dtypes, cols.shapes, strict=True)):
                target = get(index)
                if target is None or target.dtype is not dtype or target.shape != shape:
                    target = torch.empty(0, dtype=dtype)  # storage comes with allocate()
                    kept[index] = target
                    self._fresh.append(index)
                targets.append(target)
            if isinstance(kept, Kept):  # trusted once every buffer has its storage (allocate())
                kept.columns = None
                self._columns = (targets, cols)
        self.sources = list(leaves)
        self.targets = list(targets)
        self._sizes = cols.sizes
        self.nbytes = sum(cols.sizes)
        self.plain_nbytes = not walk.in_metadata
        self._plain = [False] * len(leaves)
        if cols.sizes and max(cols.sizes) >= _LARGE:
            for index in [i for i, size in enumerate(cols.sizes) if size >= _LARGE]:
                t = leaves[index]
                self._plain[index] = t.is_contiguous() and not (t.is_conj() or t.is_neg())
        walk.fill(self.targets)
        return skeleton

    # ------------------------------------------------------------------ the per-tensor path

    def _general(self, state: Any) -> Any:
        if isinstance(self._reuse, Kept):
            self._reuse.columns = None  # the walk below keeps buffers by ordinal only
        return self._copy(state)

    def _copy(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self._tensor(obj)
        if kind is dict:  # the hot loop: tensors and plain leaves inline
            tensor = self._tensor
            walk = self._copy
            out = {}
            for k, v in obj.items():
                if type(k) is not str and type(k) is not int:
                    raise Unsupported("key")
                kind = type(v)
                if kind is torch.Tensor or kind is torch.nn.Parameter:
                    out[k] = tensor(v)
                elif kind in _IMMUTABLE:
                    out[k] = v
                else:
                    out[k] = walk(v)
            return out
        if kind in _IMMUTABLE:
            return obj
        if kind is list:
            return [self._copy(v) for v in obj]
        if kind is tuple:
            return tuple([self._copy(v) for v in obj])
        if kind is OrderedDict:
            od: OrderedDict[Any, Any] = OrderedDict()
            for k, v in obj.items():
                if type(k) is not str and type(k) is not int:
                    raise Unsupported("key")
                od[k] = self._copy(v)
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                od._metadata = self._copy(meta)  # type: ignore[attr-defined]
            return od
        if kind is np.ndarray and not obj.dtype.hasobject:
            return obj.copy()
        if isinstance(obj, np.generic) and not obj.dtype.hasobject:
            return obj  # NumPy scalars are immutable
        if _dtensor.is_dtensor(obj):  # its shard copied like any tensor, its layout read now
            at = len(self.sources)
            shard = _dtensor.host_shard(obj, self._tensor)
            if len(self.sources) > at:  # torch counts changes on the DTensor, not on its shard
                self._counted[at] = obj
            return shard
        raise Unsupported(kind.__qualname__)

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.layout is not _STRIDED or t.is_quantized:
            raise Unsupported("layout")
        cpu = t.is_cpu
        if not cpu and t.device.type != "cuda":
            raise Unsupported(t.device.type)
        self._cpu = self._cpu and cpu
        shape = t.shape
        dtype = t.dtype
        nbytes = t.nbytes
        if not nbytes:
            return torch.empty(shape, dtype=dtype)  # no bytes to copy; never an alias (as in the encoder)
        ptr = t.data_ptr()
        first = self._seen.get(ptr)  # keyed by address alone: a second view there is rare
        if first is not None:
            source, found = first
            bits = (t.is_conj(), t.is_neg())  # a lazily conjugated or negated view holds other values
            if source.dtype is dtype and source.shape == shape and source.stride() == t.stride() \
                    and source.device == t.device and (source.is_conj(), source.is_neg()) == bits:
                return found
            key = (ptr, dtype, shape, t.stride(), str(t.device), bits)
            other = self._others.get(key)
            if other is not None:
                return other
        targets = self.targets
        index = len(targets)
        target = self._reuse.get(index)
        if target is None or target.dtype is not dtype or target.shape != shape:
            target = torch.empty(0, dtype=dtype)  # storage comes with allocate()
            self._reuse[index] = target
            self._fresh.append(index)
        if first is None:
            self._seen[ptr] = (t, target)
        else:
            self._others[key] = target
        self.sources.append(t)
        targets.append(target)
        self._plain.append(cpu and nbytes >= _LARGE and t.is_contiguous() and not (t.is_conj() or t.is_neg()))
        self._sizes.append(nbytes)
        self.nbytes += nbytes
        return target

    # ------------------------------------------------------------------ the copy

    def allocate(self) -> None:
        """Give every tensor of the copy its storage (not yet its bytes). Idempotent."""
        for index in self._fresh:
            src = self.sources[index]
            pinned = src.device.type == "cuda" and torch.cuda.is_available()
            _set(self.targets[index], torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned))
        self._fresh = []
        if self._columns is not None and isinstance(self._reuse, Kept):
            self._reuse.columns, self._columns = self._columns, None

    def fill(self, only: Collection[int] | None = None) -> None:
        """Copy the tensor data into the copy's tensors (all, or those whose ``data_ptr()`` is in
        ``only``). Called on the caller's thread before the save returns; raises what torch raises.
        Lets go of the live tensors afterwards (once).

        Large contiguous CPU tensors are copied as bytes in chunks (NumPy copies them without the
        GIL); the other CPU tensors in batched ``copy_`` calls (``torch._foreach_copy_``, which
        resolves strides and lazy conjugation, also without the GIL) of about a chunk's bytes
        each. This thread and one helper take the chunks and batches in turn (a helper held back
        by the machine's load delays nothing, which measured steadier than torch's own threads on
        a loaded machine). Tensors on a GPU are copied one by one into pinned memory.
        """
        self.allocate()
        dsts, srcs, sizes, plain = self.targets, self.sources, self._sizes, self._plain
        if only is not None:
            keep = list(map(only.__contains__, map(_data_ptr, dsts)))
            dsts, srcs = list(compress(dsts, keep)), list(compress(srcs, keep))
            sizes, plain = list(compress(sizes, keep)), list(compress(plain, keep))
        work: list[Callable[[], object]] = []
        devices: set[torch.device] = set()
        with torch.no_grad():
            if self._cpu and not any(plain):
                rest = dsts, srcs, sizes
            else:
                rest = [], [], []
                for dst, src, size, large in zip(dsts, srcs, sizes, plain, strict=True):
                    if large:
                        to, of = flat_bytes(dst).numpy(), flat_bytes(src).numpy()
                        work.extend(partial(np.copyto, to[at:at + _CHUNK], of[at:at + _CHUNK])
                                    for at in range(0, len(to), _CHUNK))
                    elif src.is_cpu:
                        rest[0].append(dst)
                        rest[1].append(src)
                        rest[2].append(size)
                    else:
                        dst.copy_(src, non_blocking=True)  # into pinned memory; waited for below
                        devices.add(src.device)
            work.extend(partial(torch._foreach_copy_, rest[0][a:b], rest[1][a:b]) for a, b in _batches(rest[2]))
            _two_threads(work)
            for device in devices:
                torch.cuda.synchronize(device)
        if self._versions is None:
            self.sources = []  # the live tensors are not ours to keep alive (a watched copy keeps them: changed())
        self._plain = []

    # ------------------------------------------------------------------ staging in the background

    def watch(self) -> bool:
        """Remember every live tensor's version counter (torch bumps it on each in-place change),
        for :meth:`changed` after a :meth:`fill` on another thread. Called on the caller's thread
        before an asynchronous save staged in the background returns. ``False`` (nothing
        remembered) when a tensor keeps no counter (one made under ``torch.inference_mode``): the
        caller then copies before returning."""
        try:
            self._versions = [t._version for t in self._watched()]
        except RuntimeError:  # "Inference tensors do not track version counter"
            return False
        return True

    def _watched(self) -> list[Any]:
        """What tells each source's changes: the source, or the DTensor whose shard it is."""
        if not self._counted:
            return self.sources
        return [self._counted.get(i, t) for i, t in enumerate(self.sources)]

    def changed(self) -> list[torch.Tensor]:
        """The live tensors (or DTensors) changed in place since :meth:`watch` (their bytes in the
        copy may be torn: part before the change, part after). Local; reads counters only."""
        if self._versions is None:
            return []
        return [t for t, v in zip(self._watched(), self._versions, strict=True) if t._version != v]

    def unwatch(self) -> None:
        """Forget the version counters: :meth:`fill` lets go of the live tensors again."""
        self._versions = None

    def drop_buffers(self) -> None:
        """Forget the buffers kept from the previous snapshot (a streamed snapshot must not hold
        them): every tensor of the copy gets fresh storage in :meth:`allocate`."""
        for t in self.targets:
            _set(t)
        self._fresh = list(range(len(self.targets)))
        self._reuse.clear()
        self._columns = None
        if isinstance(self._reuse, Kept):
            self._reuse.columns = None

    def free(self) -> None:
        """Let go of the copy's memory (a written snapshot nobody reads again)."""
        for t in self.targets:
            _set(t)
        self.targets = []
        if self._versions is None:
            self.sources = []  # (a watched copy keeps them for changed())
        self.state = None


def _set(t: torch.Tensor, new: torch.Tensor | None = None) -> None:
    """Point ``t`` (the same object, referenced from the copied state) at ``new``'s storage, or at none."""
    tensor: Any = t
    if new is None:
        tensor.set_()
    else:
        tensor.set_(new)


def _batches(sizes: list[int]) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of tensors of about :data:`_CHUNK` bytes each (at
    least one tensor a run), covering ``sizes``; one run for fewer than two chunks' bytes."""
    total = sum(sizes)
    if not sizes:
        return []
    if total < 2 * _CHUNK:
        return [(0, len(sizes))]
    ends = list(accumulate(sizes))
    cuts = {bisect_left(ends, k * _CHUNK) + 1 for k in range(1, total // _CHUNK + 1)}  # after the tensor reaching k chunks
    bounds = [0, *sorted(cuts - {len(sizes)}), len(sizes)]
    return list(pairwise(bounds))


def _two_threads(work: list[Callable[[], object]]) -> None:
    """Run every item of ``work``, the calling thread and one helper taking the next in turn from
    one shared iterator (the copies release the GIL), each without autograd. Returns when all are
    done; raises what an item raised."""
    pending = iter(work)  # a list iterator: each item goes to exactly one thread (the GIL)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():  # grad mode is per thread: a copy_ from a parameter records nothing
                for item in pending:
                    item()
        except BaseException as exc:
            failed.append(exc)

    helper = None
    if len(work) > 1 and _CPUS > 1:
        helper = threading.Thread(target=run, name="distckpt-snapshot", daemon=True)
        helper.start()
    run()
    if helper is not None:
        helper.join()
    if failed:
        raise failed[0]
