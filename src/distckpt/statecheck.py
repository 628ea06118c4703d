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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .codec import FileLayout, gc_paused
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
    saved: dict[str, _Saved] = {}
    for layout in layouts:  # by columns: no object per entry
        text = {dtype: _dtype_name(dtype) for dtype in set(layout.dtypes)}
        saved.update(zip(layout.names, zip(map(text.__getitem__, layout.dtypes), layout.shapes, strict=True),
                         strict=True))
    walk = _Walk(saved, strict)
    walk.walk(layouts[0].skeleton, live)
    return [f"component {key!r}, {line}" for line in walk.lines]


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
    with gc_paused():  # the parsed headers are freed before the collector runs again (see reading)
        problems = _problems(actions, components, rank, strict, layouts_of)
    if problems:
        raise StateMismatchError(f"{path}: the saved state does not fit the live state dict (nothing was read "
                                 "into it): " + "; ".join(problems))


def _problems(actions: Mapping[str, ComponentManifest], components: Sequence[StateComponent], rank: int,
              strict: bool, layouts_of: Callable[[Sequence[FileEntry]], Sequence[FileLayout] | None]) -> list[str]:
    """:func:`check_live_state`'s lines, one per component that does not fit."""
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
    return problems


def describe_problems(problems: Sequence[str]) -> str:
    """The lines of :func:`check_state` for one rank's failure: the first :data:`MAX_PROBLEMS`
    and a count of the rest."""
    shown = list(problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        shown.append(f"... and {len(problems) - MAX_PROBLEMS} more")
    return "; ".join(shown)


class _Walk:
    """The skeleton and the live state walked together, a line per difference (in walk order).

    Paths serve only the lines, so they are built only for a line: the walk keeps the keys
    that lead to the current node (thousands of tensors, a handful of differences at most).
    """

    def __init__(self, saved: Mapping[str, _Saved], strict: bool) -> None:
        self.saved = saved
        self.strict = strict
        self.keys: list[Any] = []
        self.lines: list[str] = []
        self.dtype_names: dict[torch.dtype, str] = {}

    def path(self) -> str:
        path = ""
        for key in self.keys:
            path = _join(path, key)
        return path

    def walk(self, node: Any, live: Any) -> None:
        keys = self.keys
        if isinstance(node, list):
            if isinstance(live, (list, tuple)) and len(live) == len(node):
                for index, (n, item) in enumerate(zip(node, live, strict=True)):
                    keys.append(index)
                    self.walk(n, item)
                    keys.pop()
            return
        if not isinstance(node, dict) or len(node) == 0:
            return
        tag = next(iter(node))
        body = node[tag]
        if tag in ("$dict", "$odict") and isinstance(live, Mapping) and isinstance(body, list):
            self.mapping(body, live)
        elif tag == "$tuple":
            self.walk(body, live)
        elif tag == "$tensor" and _plain(live):
            self.tensor(node, live)

    def mapping(self, body: list[Any], live: Mapping[Any, Any]) -> None:
        pairs = [(p[0], p[1]) for p in body if isinstance(p, list) and len(p) == 2 and type(p[0]) in (str, int)]
        if self.strict and live:
            saved_tensors = {k for k, v in pairs
                             if type(v) is dict and v and next(iter(v)) in ("$tensor", "$dtensor")}
            live_tensors = {k for k, v in live.items() if isinstance(v, torch.Tensor)}
            if saved_tensors and live_tensors and saved_tensors != live_tensors:
                self.lines.append(_key_sets(self.path(), sorted(live_tensors - saved_tensors, key=repr),
                                            sorted(saved_tensors - live_tensors, key=repr)))
        keys = self.keys
        for k, v in pairs:
            if k in live:
                item = live[k]
                if type(v) is dict and len(v) == 1 and (type(item) is torch.Tensor or type(item) is torch.nn.Parameter):
                    if "$tensor" in v:  # a tensor stored natively, inline
                        keys.append(k)
                        self.tensor(v, item)
                        keys.pop()
                    continue
                keys.append(k)
                self.walk(v, item)
                keys.pop()

    def tensor(self, node: dict[str, Any], live: torch.Tensor) -> None:
        found = self.saved.get(node["$tensor"]) if type(node["$tensor"]) is str else None
        if found is None:
            return
        dtype, shape = found
        if "dtype" in node:  # a dtype safetensors lacks: stored as bytes, the real one in the skeleton
            raw_shape = node.get("shape")
            if type(node["dtype"]) is not str or not isinstance(raw_shape, list):
                return
            dtype, shape = node["dtype"], tuple(raw_shape)
        live_shape = live.shape
        live_dtype = self.dtype_names.get(live.dtype)
        if live_dtype is None:
            live_dtype = self.dtype_names[live.dtype] = _dtype_name(live.dtype)
        if shape != live_shape:
            self.lines.append(f"entry {self.path() or '<root>'!r}: saved shape {list(shape)} ({dtype}), "
                              f"live shape {list(live_shape)} ({live_dtype})")
        elif self.strict and dtype != live_dtype:
            self.lines.append(f"entry {self.path() or '<root>'!r}: saved dtype {dtype}, live dtype {live_dtype} "
                              f"(shape {list(shape)})")


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


def _plain(value: Any) -> bool:
    """A tensor this check understands: not a DTensor or other subclass with its own layout."""
    return type(value) is torch.Tensor or type(value) is torch.nn.Parameter


def _join(path: str, key: Any) -> str:
    name = entry_name(key)
    return f"{path}.{name}" if path else name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
