"""The encoder's fast walk: a state dict straight to its skeleton's JSON text.

Pure: no I/O, no collectives. Called by :func:`.encoder.encode` for the common
case (no ``copy``). It writes the very text ``json.dumps(skeleton,
separators=(",", ":"), allow_nan=False)`` gives for the skeleton the encoder's
:meth:`~.encoder._Encoder.value` would build (tests/unit/test_format_stability.py
pins those bytes), without building the skeleton's dicts and lists first. Plain
contiguous CPU tensors are referenced inline; anything else (other tensors,
leaves that are not JSON scalars) goes through the encoder and ``json.dumps``.
Raises :class:`SerializationError` for anything it cannot take (a bad key): the
caller then encodes again with the walk that names the path; and for a state
nested deeper than :data:`.dtypes.SKELETON_DEPTH` JSON levels.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any, Protocol

import torch

from .. import boundedjson
from ..errors import SerializationError
from .dtypes import _FAST_DTYPES, SKELETON_DEPTH


class Collector(Protocol):
    """What the walk needs of the encoder (:class:`.encoder._Encoder`): where tensors are
    collected, and its general walk for anything else."""

    tensors: list[tuple[str, torch.Tensor, str, int, int]]
    _by_ptr: dict[int, tuple[torch.Tensor, dict[str, Any]]]

    def value(self, obj: Any, path: str) -> Any: ...

    def tensor(self, t: torch.Tensor, path: str) -> Any: ...

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class TooDeep(SerializationError):
    """The state nests deeper than a skeleton may (the caller words the message)."""


def skeleton_text(enc: Collector, state: Any) -> str:
    """The skeleton of ``state`` as JSON text; ``enc`` collects its tensors, in traversal order."""
    out: list[str] = []
    _Walk(enc, out).value(state, 0)
    return "".join(out)


class _Walk:
    def __init__(self, enc: Collector, out: list[str]) -> None:
        self.enc = enc
        self.out = out
        self.tensors = enc.tensors
        self.by_ptr = enc._by_ptr

    def value(self, obj: Any, depth: int) -> None:
        """Append ``obj``'s text; ``depth``: the JSON arrays and objects around it."""
        out = self.out
        kind = type(obj)
        if kind is dict:
            self.pairs("$dict", obj, depth)
        elif obj is None:
            out.append("null")
        elif kind is str:
            out.append(_quoted(obj))
        elif kind is bool:
            out.append("true" if obj else "false")
        elif kind is int:
            out.append(int.__repr__(obj))
        elif kind is float and math.isfinite(obj):
            out.append(float.__repr__(obj))
        elif kind is list or kind is tuple:
            inner = depth + (1 if kind is list else 2)
            if inner > SKELETON_DEPTH:
                raise TooDeep("too deep")
            out.append("[" if kind is list else '{"$tuple":[')
            for i, v in enumerate(obj):
                if i:
                    out.append(",")
                self.value(v, inner)
            out.append("]" if kind is list else "]}")
        elif kind is OrderedDict:
            self.pairs("$odict", obj, depth)
        elif kind in _PLAIN:
            self.tensor(obj, depth)
        else:
            self.fragment(self.enc.value(obj, ""), depth)

    def pairs(self, tag: str, obj: dict[Any, Any], depth: int) -> None:
        """A dict or OrderedDict: ``{"$dict":[[key,value],...]}`` (``$odict``, with ``meta``)."""
        out = self.out
        if depth + 2 + bool(obj) > SKELETON_DEPTH:
            raise TooDeep("too deep")
        out.append('{"' + tag + '":[')
        inner = depth + 3
        first = True
        for k, v in obj.items():
            kk = type(k)
            if kk is str:
                key = _quoted(k)
            elif kk is int:
                key = int.__repr__(k)
            else:
                raise SerializationError("bad key")
            out.append(("[" if first else ",[") + key + ",")
            first = False
            vk = type(v)
            if vk is torch.Tensor or vk is torch.nn.Parameter:
                self.tensor(v, inner)
            elif v is None or vk is str or vk is int or vk is bool:
                out.append("null" if v is None else _quoted(v) if vk is str else
                           ("true" if v else "false") if vk is bool else int.__repr__(v))
            else:
                self.value(v, inner)
            out.append("]")
        out.append("]")
        if tag == "$odict":
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                out.append(',"meta":')
                self.value(meta, depth + 1)
        out.append("}")

    def tensor(self, t: torch.Tensor, depth: int) -> None:
        """A plain contiguous CPU tensor of a dtype safetensors has (never quantized), not a lazily
        conjugated or negated view, seen for the first time: referenced as is. Else the encoder's."""
        fast = _FAST_DTYPES.get(t.dtype)
        if not (fast is None or not t.is_cpu or t.layout is not torch.strided or not t.is_contiguous()
                or t.is_neg() or (fast[2] and t.is_conj())):
            nbytes = t.nbytes
            ptr = t.data_ptr()
            if nbytes and ptr not in self.by_ptr:
                if depth + 1 > SKELETON_DEPTH:
                    raise TooDeep("too deep")
                tensors = self.tensors
                name = f"t{len(tensors)}"
                tensors.append((name, t, fast[0], fast[1], nbytes))
                self.by_ptr[ptr] = (t, {"$tensor": name})
                self.out.append('{"$tensor":"' + name + '"}')
                return
        self.fragment(self.enc.tensor(t, ""), depth)

    def fragment(self, node: Any, depth: int) -> None:
        """A node the encoder built, as ``json.dumps`` writes it inside the whole skeleton."""
        text = json.dumps(node, separators=(",", ":"), allow_nan=False)
        if (depth + text.count("[") + text.count("{") > SKELETON_DEPTH  # a bound; the exact depth if needed
                and depth + boundedjson.nesting_depth(text) > SKELETON_DEPTH):
            raise TooDeep("too deep")
        self.out.append(text)
