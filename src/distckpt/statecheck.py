"""State check: does the state a checkpoint holds fit the live state dict? Pure.

Called on every rank by the load path after it parsed the headers of the files
this rank will read (:func:`distckpt.reading.read_layouts`) and before any byte
is read into a live tensor, for the components whose stateful is an
``nn.Module`` or an optimizer (:data:`CHECKED_KINDS`). It walks the file's skeleton (the typed JSON
structure :mod:`distckpt.codec` writes) alongside the component's current
``state_dict()`` and reports, for every tensor present on both sides, a shape
or dtype that differs, and for every mapping whose values are tensors on both
sides, keys present on one side only. The load turns the lines it returns into
:class:`~distckpt.errors.StateMismatchError` on every rank.

What it leaves alone, on purpose: non-tensor leaves (their values are the state),
containers that are empty on the live side (an optimizer's ``state`` before its
first step), DTensors (:mod:`distckpt.dtensor` checks their layout), and, under
``strict=False``, key sets and dtypes (a ``load_state_dict`` that casts, or loads a
subset, is the caller's choice). Shapes are always checked: no ``load_state_dict``
can put a ``[4, 8]`` tensor into a ``[8, 8]`` one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .codec import FileLayout
from .components import StateComponent
from .digests import entry_name
from .errors import StateMismatchError
from .manifest import ComponentManifest, FileEntry

__all__ = ["CHECKED_KINDS", "MAX_PROBLEMS", "check_live_state", "check_state", "describe_problems"]

#: Problems listed per component; the rest are counted.
MAX_PROBLEMS = 8

_Saved = tuple[str, tuple[int, ...]]  # dtype name, shape


def check_state(key: str, layouts: Sequence[FileLayout], live: Any, *, strict: bool = True) -> list[str]:
    """Every difference between component ``key``'s saved state and ``live``, one line each.

    ``layouts``: the parsed headers of the files this rank reads for the component
    (one file, or the parts of a balanced write in part order; the skeleton is part
    0's). ``live``: the component's current ``state_dict()``. An empty list means the
    saved state fits. Never raises for a malformed skeleton (the read phase refuses
    those, naming the file).
    """
    if not layouts or layouts[0].skeleton is None:
        return []
    saved = {e.name: (_dtype_name(e.dtype), tuple(e.shape)) for layout in layouts for e in layout.entries}
    return [f"component {key!r}, {line}" for line in _walk(layouts[0].skeleton, live, "", saved, strict)]


#: The statefuls whose state is checked: their ``load_state_dict`` copies into tensors that already
#: exist, so a saved tensor of another shape cannot fit. Other statefuls may replace their tensors
#: wholesale (a growing history, a buffer sized by the data), so their state is theirs to judge.
CHECKED_KINDS: tuple[type, ...] = (torch.nn.Module, torch.optim.Optimizer)


def check_live_state(path: str, actions: Mapping[str, ComponentManifest], components: Sequence[StateComponent],
                     rank: int, strict: bool,
                     layouts_of: Callable[[Sequence[FileEntry]], Sequence[FileLayout] | None]) -> None:
    """This rank, before the read phase: every component to load fits its live ``state_dict()``.

    Called by the load path inside its compatibility collective, so one rank's
    mismatch fails every rank before any byte is read. ``layouts_of(entries)``
    gives the parsed headers of this rank's files of a component, or ``None``
    when they cannot be read (the read phase then names the file). Raises
    :class:`StateMismatchError` listing every difference (up to
    :data:`MAX_PROBLEMS` per component).
    """
    by_key = {c.key: c for c in components}
    problems: list[str] = []
    for key, saved in actions.items():
        component = by_key[key]
        if not isinstance(component.stateful, CHECKED_KINDS):
            continue
        live = component.stateful.state_dict()  # on every rank alike, even where a header is unreadable
        layouts = layouts_of(saved.files_for_rank(rank, component.pattern.elastic))
        found = check_state(key, layouts, live, strict=strict) if layouts else []
        if found:
            problems.append(describe_problems(found))
    if problems:
        raise StateMismatchError(f"{path}: the saved state does not fit the live state dict (nothing was read "
                                 "into it): " + "; ".join(problems))


def describe_problems(problems: Sequence[str]) -> str:
    """The lines of :func:`check_state` for one rank's failure: the first :data:`MAX_PROBLEMS`
    and a count of the rest."""
    shown = list(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return "; ".join(shown)


def _walk(node: Any, live: Any, path: str, saved: Mapping[str, _Saved], strict: bool) -> Iterator[str]:
    if isinstance(node, list):
        if isinstance(live, (list, tuple)) and len(live) == len(node):
            for index, (n, item) in enumerate(zip(node, live, strict=True)):
                yield from _walk(n, item, _join(path, index), saved, strict)
        return
    if not isinstance(node, dict) or len(node) == 0:
        return
    tag = next(iter(node))
    body = node[tag]
    if tag in ("$dict", "$odict") and isinstance(live, Mapping) and isinstance(body, list):
        yield from _mapping(body, live, path, saved, strict)
    elif tag == "$tuple":
        yield from _walk(body, live, path, saved, strict)
    elif tag == "$tensor" and _plain(live):
        yield from _tensor(node, live, path, saved, strict)


def _mapping(body: list[Any], live: Mapping[Any, Any], path: str, saved: Mapping[str, _Saved],
             strict: bool) -> Iterator[str]:
    pairs = [(p[0], p[1]) for p in body if isinstance(p, list) and len(p) == 2 and type(p[0]) in (str, int)]
    if strict and live:
        saved_tensors = {k for k, v in pairs if _is_tensor_node(v)}
        live_tensors = {k for k, v in live.items() if isinstance(v, torch.Tensor)}
        if saved_tensors and live_tensors and saved_tensors != live_tensors:
            yield _key_sets(path, sorted(live_tensors - saved_tensors, key=repr),
                            sorted(saved_tensors - live_tensors, key=repr))
    for k, v in pairs:
        if k in live:
            yield from _walk(v, live[k], _join(path, k), saved, strict)


def _tensor(node: dict[str, Any], live: torch.Tensor, path: str, saved: Mapping[str, _Saved],
            strict: bool) -> Iterator[str]:
    found = saved.get(node["$tensor"]) if type(node["$tensor"]) is str else None
    if found is None:
        return
    dtype, shape = found
    if "dtype" in node:  # a dtype safetensors lacks: stored as bytes, the real one in the skeleton
        raw_shape = node.get("shape")
        if type(node["dtype"]) is not str or not isinstance(raw_shape, list):
            return
        dtype, shape = node["dtype"], tuple(raw_shape)
    live_dtype, live_shape = _dtype_name(live.dtype), tuple(live.shape)
    if shape != live_shape:
        yield (f"entry {path or '<root>'!r}: saved shape {list(shape)} ({dtype}), "
               f"live shape {list(live_shape)} ({live_dtype})")
    elif strict and dtype != live_dtype:
        yield f"entry {path or '<root>'!r}: saved dtype {dtype}, live dtype {live_dtype} (shape {list(shape)})"


def _key_sets(path: str, missing: list[Any], unexpected: list[Any]) -> str:
    where = f"entries under {path!r}" if path else "entries"
    parts = []
    if missing:
        parts.append(f"live state has {_names(missing)} that the checkpoint lacks")
    if unexpected:
        parts.append(f"checkpoint has {_names(unexpected)} that the live state lacks")
    return f"{where}: " + " and ".join(parts)


def _names(keys: list[Any]) -> str:
    shown = [entry_name(k) for k in keys[:6]]
    return "[" + ", ".join(shown) + (f", ... {len(keys) - 6} more" if len(keys) > 6 else "") + "]"


def _is_tensor_node(node: Any) -> bool:
    return isinstance(node, dict) and len(node) > 0 and next(iter(node)) in ("$tensor", "$dtensor")


def _plain(value: Any) -> bool:
    """A tensor this check understands: not a DTensor or other subclass with its own layout."""
    return type(value) is torch.Tensor or type(value) is torch.nn.Parameter


def _join(path: str, key: Any) -> str:
    name = entry_name(key)
    return f"{path}.{name}" if path else name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
