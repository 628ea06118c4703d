"""The bulk path of the async snapshot copy: one lean walk, then the per-tensor checks on columns.

Called by :class:`distckpt.hostcopy.StateCopy` on the caller's thread of
``save_checkpoint(async_save=True)``, before its per-tensor path. :class:`Walk`
rebuilds a state's containers with no function call per tensor: each tensor
leaf is left as a slot (container, key) and collected, in the order the
per-tensor walk meets it. :func:`columns` then reads each attribute the copy
needs for all leaves at once (C-level ``map``) and says whether they are all
plain: CPU, strided, not quantized, not empty and at distinct addresses (no
two views of the same bytes). :class:`Kept` holds the host buffers kept from
the last snapshot together with their dtypes and shapes, so that a state
whose tensors still have the same dtypes and shapes reuses every buffer with
two list comparisons.

Anything else (a tensor right inside a tuple or at the top, a key that is not
a str or int, a container subclass, an unknown object, deep nesting) raises
:class:`Irregular`, and anything unusual about the tensors makes
:func:`columns` answer ``None``: StateCopy then takes its per-tensor path,
which copies the same way or raises :class:`~distckpt.hostcopy.Unsupported`.
Pure: no I/O, no collectives.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Columns", "Irregular", "Kept", "Walk", "columns", "entry_path"]

_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_KEYS = frozenset({str, int})
#: Leaves that nothing can change in place: shared between the live state and its copy.
IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes, torch.dtype, torch.Size, torch.device})
_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
_is_cpu = operator.attrgetter("is_cpu")
_layout = operator.attrgetter("layout")
_dtype = operator.attrgetter("dtype")
_shape = operator.attrgetter("shape")
_nbytes = operator.attrgetter("nbytes")
_data_ptr = torch.Tensor.data_ptr


class Irregular(Exception):
    """The state holds something the bulk walk leaves to the per-tensor walk."""


class Walk:
    """One lean walk of a state: ``copy(state)`` rebuilds its containers (leaves that cannot
    change in place shared, NumPy arrays copied) with ``None`` where each tensor goes;
    ``leaves`` are the tensors in the per-tensor walk's order, ``holders[i][keys[i]]`` the
    slot of ``leaves[i]``. Raises :class:`Irregular` (or ``RecursionError``)."""

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []
        self.holders: list[Any] = []
        self.keys: list[Any] = []
        self.in_metadata = False  # a leaf under an OrderedDict's ``_metadata`` (codec.state_nbytes skips them)

    def copy(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is dict:
            return self._items(obj, {})
        if kind in IMMUTABLE:
            return obj
        if kind is list:
            out: list[Any] = []
            for index, v in enumerate(obj):
                kind = type(v)
                if kind in _TENSORS:
                    out.append(None)
                    self._slot(out, index, v)
                else:
                    out.append(v if kind in IMMUTABLE else self.copy(v))
            return out
        if kind is tuple:
            if not _TENSORS.isdisjoint(map(type, obj)):
                raise Irregular("a tensor in a tuple")  # no slot to fill in later
            return tuple([self.copy(v) for v in obj])
        if kind is OrderedDict:
            od: OrderedDict[Any, Any] = self._items(obj, OrderedDict())
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                before = len(self.leaves)
                od._metadata = self.copy(meta)  # type: ignore[attr-defined]
                self.in_metadata |= len(self.leaves) > before
            return od
        if kind is np.ndarray and not obj.dtype.hasobject:
            return obj.copy()
        if isinstance(obj, np.generic) and not obj.dtype.hasobject:
            return obj  # NumPy scalars are immutable
        raise Irregular(kind.__qualname__)

    def _items(self, obj: Any, out: Any) -> Any:
        if not _KEYS.issuperset(map(type, obj)):
            raise Irregular("key")
        leaves, holders, keys = self.leaves, self.holders, self.keys
        for k, v in obj.items():
            kind = type(v)
            if kind in _TENSORS:
                out[k] = None
                leaves.append(v)
                holders.append(out)
                keys.append(k)
            elif kind in IMMUTABLE:
                out[k] = v
            else:
                out[k] = self.copy(v)
        return out

    def _slot(self, holder: Any, key: Any, t: torch.Tensor) -> None:
        self.leaves.append(t)
        self.holders.append(holder)
        self.keys.append(key)

    def fill(self, outs: list[torch.Tensor]) -> None:
        """Put ``outs[i]`` (the copy of ``leaves[i]``) in its slot."""
        list(map(operator.setitem, self.holders, self.keys, outs))


class Columns(NamedTuple):
    """The dtypes, shapes and byte sizes of a list of tensors, position by position."""

    dtypes: list[torch.dtype]
    shapes: list[torch.Size]
    sizes: list[int]


def columns(leaves: list[torch.Tensor]) -> Columns | None:
    """The columns of ``leaves`` if every one is plain (a strided, non-quantized CPU tensor with
    bytes, no two at the same address), else ``None``. Raises nothing of its own."""
    try:
        if not all(map(_is_cpu, leaves)) or not {torch.strided}.issuperset(map(_layout, leaves)):
            return None
        dtypes = list(map(_dtype, leaves))
        if not _QUANTIZED.isdisjoint(dtypes):
            return None
        sizes = list(map(_nbytes, leaves))
        if 0 in sizes or len(set(map(_data_ptr, leaves))) != len(leaves):
            return None
        return Columns(dtypes, list(map(_shape, leaves)), sizes)
    except RuntimeError:  # an attribute this kind of tensor does not have: the per-tensor path says why
        return None


class Kept(dict[int, torch.Tensor]):
    """Host buffers kept from one component's last snapshot, by tensor ordinal (what the
    per-tensor copy and the general encoder reuse), and ``columns``: the bulk copy's list of
    them with their dtypes and shapes (valid while this mapping still holds those tensors in
    that order; :meth:`reusable` checks)."""

    columns: tuple[list[torch.Tensor], Columns] | None = None

    def reusable(self, wanted: Columns) -> list[torch.Tensor] | None:
        """The kept buffers, in order, if there is one for each of ``wanted`` with its dtype and
        shape, as kept by the last bulk copy and not replaced since; else ``None``."""
        if self.columns is None:
            return None
        targets, had = self.columns
        if had.dtypes != wanted.dtypes or had.shapes != wanted.shapes or len(self) < len(targets) \
                or not all(map(operator.is_, self.values(), targets)):
            return None
        return targets



def entry_path(state: Any, target: torch.Tensor) -> str | None:
    """The dotted path (as the encoder names entries: ``"layer.weight"``, ``"state.0.exp_avg"``)
    of the first leaf of ``state`` that is the object ``target``, or ``None``. Called to name a
    tensor in an error message only (a full walk). Pure."""
    stack: list[tuple[str, Any]] = [("", state)]
    while stack:
        path, obj = stack.pop()
        if obj is target:
            return path
        if isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, (list, tuple)):
            items = list(enumerate(obj))
        else:
            continue
        stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(items))
    return None
