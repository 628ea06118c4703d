"""Reading: one component's files for one rank, verified, decoded, in place when possible.

Called by the coordinator's read phase and by the CLI; not collective. A
component's data for a rank is one file, or the parts of a balanced write
(several files of one replica set, in part order). When the component's
current state dict is given, tensors whose path, dtype and shape match the
file are read straight into that memory (no second buffer, no copy in
``load_state_dict``); everything else is read into a scratch buffer that is
never zero-filled.

Failure: :class:`~distckpt.errors.IntegrityError` naming the bad file. The
checksum covers the whole file and is known only at its end, so after a
failure the tensors read in place hold unverified bytes; the load raises on
every rank, and the trainer must load again (or restart) before training on.
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

import torch

from . import codec, dtensor, storage
from .errors import IntegrityError
from .manifest import FileEntry

__all__ = ["decode_files", "read_component", "read_files", "read_layouts"]

_PROGRESS_STEP = 64 * 1024 * 1024


def read_component(root: str, entries: Sequence[FileEntry], live: Any = None,
                   progress: Callable[[int], None] | None = None,
                   restore: Callable[[Any], Any] | None = None) -> Any:
    """Read, verify and decode ``entries`` (one file or the parts of one replica set) under ``root``.

    ``live``: the component's current state dict to read into, or ``None``
    to decode into fresh memory. Returns the decoded state dict, whose
    matching tensors *are* the live ones. ``progress``: called with the
    number of bytes read so far each time a stretch of at most 64 MiB has been read.
    ``restore``: applied to the decoded state when the skeleton may hold a DTensor
    (:func:`distckpt.dtensor.restore`, say); skipped, with its walk of the state, when surely none.
    """
    if not entries:
        raise IntegrityError(f"{root}: no file to read")
    # One collector pause for the whole read: thousands of small objects (the parsed header and
    # skeleton, a view per tensor) are made and, all but the decoded state, freed before it ends,
    # so that no collection walks them (a pause per step would leave them to the next one).
    with codec.gc_paused():
        state = _read_and_decode(root, entries, live, progress, restore)
    return state


def _read_and_decode(root: str, entries: Sequence[FileEntry], live: Any,
                     progress: Callable[[int], None] | None, restore: Callable[[Any], Any] | None) -> Any:
    """:func:`read_component`'s work; its temporaries are freed when it returns."""
    parts: list[tuple[codec.FileLayout, memoryview]] = []
    overrides: dict[str, torch.Tensor] = {}
    try:
        _read_parts(root, entries, live, parts, overrides, progress)
    except IntegrityError as exc:
        if not overrides:
            raise
        raise IntegrityError(
            f"{exc.message} (tensors of this component were being read in place and now hold partial "
            "data: load another checkpoint or re-initialise them before training; load_in_place=False "
            "keeps them intact when a load fails)"
        ) from None
    where = storage.safe_join(root, entries[0].path)
    state = codec.assemble(parts, overrides, where=where)
    return restore(state) if restore is not None and parts[0][0].dtensors else state


def _read_parts(root: str, entries: Sequence[FileEntry], live: Any,
                parts: list[tuple[codec.FileLayout, memoryview]], overrides: dict[str, torch.Tensor],
                progress: Callable[[int], None] | None = None) -> None:
    """Read every file of ``entries`` in order, filling ``parts`` and ``overrides`` as it goes.

    Live targets (matched by entry index, :func:`~distckpt.codec.in_place`)
    are read straight into, 512 buffers per ``readv``; the gaps between them
    go to the scratch buffer.
    """
    skeleton: Any = None
    for index, entry in enumerate(entries):
        full = storage.safe_join(root, entry.path)
        with storage.VerifiedReader(full, entry.size_bytes, entry.checksum) as reader:
            try:
                start = codec.header_length(reader.read_to(min(8, entry.size_bytes)), entry.size_bytes, full)
                layout = _parsed(full, reader.read_to(start), entry.size_bytes)
                _check_part(layout, index, len(entries), full)
            except IntegrityError:
                reader.finish()  # a damaged file is reported as such, not as a malformed header
                raise
            if index == 0:
                skeleton = layout.skeleton
            targets = None
            if live is not None and _disjoint(layout):
                targets = codec.in_place(skeleton, layout, live)  # pure: nothing is read yet
            if live is not None and index == 0 and (layout.dtensors or targets is None or targets.foreign):
                dtensor.check_skeleton(skeleton, live, full)  # before any byte lands in a live tensor
            views: list[memoryview] = []  # file order: scratch-buffer gaps and live tensors
            if targets is not None and targets.indices:
                views = _file_order(reader, layout, targets)
                overrides.update(targets.tensors)
            if progress is None:
                reader.read_into(views)  # one readv per 512 buffers, not one per tensor
                parts.append((layout, reader.finish()))
                continue
            _read_reporting(reader, views, progress)
            before = reader.position
            parts.append((layout, reader.finish()))
            progress(entry.size_bytes - before)


def _file_order(reader: storage.VerifiedReader, layout: codec.FileLayout, targets: codec.InPlace) -> list[memoryview]:
    """The views to read the rest of the file into, in file order: each in-place target's, and
    the scratch buffer's for the stretches between them (none when the targets lie back to back,
    the common case, told by one comparison of columns)."""
    position = reader.position
    buffer, begins, ends, indices = reader.buffer, layout.begins, layout.ends, targets.indices
    if all(map(operator.eq, map(begins.__getitem__, indices[1:]), map(ends.__getitem__, indices))):
        first = begins[indices[0]]
        return [buffer[position:first], *targets.views] if first > position else list(targets.views)
    views: list[memoryview] = []
    for i, view in zip(indices, targets.views, strict=True):
        begin = begins[i]
        if begin > position:
            views.append(buffer[position:begin])
        views.append(view)
        position = ends[i]
    return views


def _read_reporting(reader: storage.VerifiedReader, views: list[memoryview],
                    progress: Callable[[int], None]) -> None:
    """As ``reader.read_into(views)`` then up to the end of the file, in stretches of at most
    :data:`_PROGRESS_STEP` bytes, calling ``progress(bytes)`` after each (the caller's finish()
    verifies; the bytes before the first stretch, the header, are counted with the first).
    A stretch ends with the view that reaches the step; a view longer than it is cut first."""
    step = _PROGRESS_STEP
    lengths = list(map(len, views))
    if lengths and max(lengths) > step:
        views = [v[i:i + step] for v in views for i in range(0, len(v), step)]
        lengths = list(map(len, views))
    ends = list(accumulate(lengths))  # ends[k]: bytes up to the end of view k
    counted = 0
    start = done = 0
    while start < len(views):
        stop = min(bisect_left(ends, done + step, start) + 1, len(views))
        reader.read_into(views[start:stop])
        progress(reader.position - counted)
        counted, start, done = reader.position, stop, ends[stop - 1]
    while reader.position + _PROGRESS_STEP < reader.size:
        reader.read_to(reader.position + _PROGRESS_STEP)
        progress(reader.position - counted)
        counted = reader.position
    progress(reader.position - counted)


def _disjoint(layout: codec.FileLayout) -> bool:
    """Entries are sorted by offset; in-place reading needs them not to overlap."""
    return all(map(operator.le, layout.ends[:-1], layout.begins[1:]))


def _check_part(layout: codec.FileLayout, index: int, count: int, where: str) -> None:
    """A part file must say it is that part; a single file must not claim to be one."""
    expected = None if count == 1 else f"{index}/{count}"
    if layout.part != expected:
        found = "no part label" if layout.part is None else f"part label {layout.part!r}"
        wanted = "none" if expected is None else repr(expected)
        raise IntegrityError(f"{where}: file has {found}, the manifest expects {wanted}")


def read_files(root: str, entries: Sequence[FileEntry]) -> list[memoryview]:
    """Read and verify each of ``entries`` whole (the reader of a read-and-broadcast load)."""
    return [storage.read_verified(storage.safe_join(root, e.path), e.size_bytes, e.checksum) for e in entries]


def decode_files(root: str, entries: Sequence[FileEntry], buffers: Sequence[memoryview]) -> Any:
    """Decode whole files already in memory (one, or the parts in order), as :func:`read_component` would."""
    parts = []
    for index, (entry, buffer) in enumerate(zip(entries, buffers, strict=True)):
        full = storage.safe_join(root, entry.path)
        layout = codec.parse_header(buffer[:codec.header_length(buffer[:8], len(buffer), full)], len(buffer), full)
        _check_part(layout, index, len(entries), full)
        parts.append((layout, buffer))
    return codec.assemble(parts, where=storage.safe_join(root, entries[0].path))


def read_layouts(root: str, entries: Sequence[FileEntry]) -> list[codec.FileLayout] | None:
    """The parsed headers of ``entries`` (one file, or the parts in order), nothing else read.

    Called by the load path's state check on every rank, before the read phase;
    not collective. The headers are not yet verified (the checksum covers the
    whole file), so a header that cannot be read or parsed gives ``None``: the
    read phase then reports the file properly (missing, damaged, malformed).
    """
    layouts = []
    try:
        for entry in entries:
            full = storage.safe_join(root, entry.path)
            start = codec.header_length(storage.read_prefix(full, 0, 8), entry.size_bytes, full)
            header = storage.read_prefix(full, 0, start)
            if len(header) != start:
                return None
            layout = codec.parse_header(header, entry.size_bytes, full)
            layouts.append(layout)
            if len(_PARSED) >= _PARSED_LIMIT:
                _PARSED.clear()
            _PARSED[full] = (header, entry.size_bytes, layout)
    except (IntegrityError, OSError, ValueError):
        return None
    return layouts


#: Headers the state check parsed, by file, for the read phase that follows: ``(header bytes, file
#: size, layout)``. A layout is a function of the header's bytes and the file's size alone, so the read
#: phase takes it only when the bytes it has just read (and is verifying) are the very same; each entry
#: is taken once. Bounded: cleared when it holds :data:`_PARSED_LIMIT` files (a load that stopped
#: between its two phases leaves its entries behind).
_PARSED: dict[str, tuple[bytes, int, codec.FileLayout]] = {}
_PARSED_LIMIT = 256


def _parsed(full: str, header: memoryview, size: int) -> codec.FileLayout:
    """The layout of ``header`` (a file's first bytes, through its JSON header), parsed by the state
    check moments ago when its bytes are the same, else parsed now. Raises as :func:`codec.parse_header`."""
    known = _PARSED.pop(full, None)
    if known is not None and known[1] == size and len(known[0]) == len(header) and known[0] == header:
        return known[2]
    return codec.parse_header(header, size, full)
