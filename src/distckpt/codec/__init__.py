"""Codec: state dicts to safetensors bytes and back, without pickle.

Pure package: builds and parses bytes in memory; :mod:`distckpt.storage` streams
them to disk. Tensor leaves become safetensors tensors; everything else (nested
dicts with int or str keys, lists, tuples, None, bool, int, float including
inf/nan, str, bytes, NumPy arrays and scalars, torch dtypes, sizes and devices)
becomes a typed JSON *skeleton* stored in the safetensors metadata under
``distckpt.skeleton``. An object outside that set raises
:class:`SerializationError` naming its path (``optimizer.state.3.foo``).

Skeleton grammar: JSON null/bool/int/str/list stand for themselves, finite
floats are JSON numbers, and every other value is a one-tag object such as
``{"$tuple": [...]}``, ``{"$dict": [[key, value], ...]}`` or ``{"$tensor": "t7"}``.

One module per concept; callers use the names re-exported here
(``codec.encode``, ``from distckpt.codec import decode``):

- :mod:`.dtypes`: the format's keys and limits, dtype names, a tensor's bytes;
- :mod:`.encoded`: :class:`EncodedState` and the text of its safetensors header;
- :mod:`.encoder`: :func:`encode` (with its path-free fast walk and the DTensor hooks);
- :mod:`.header`: :func:`parse_header` into a columnar :class:`FileLayout`;
- :mod:`.headerscan`: the compact header form read with one regex split (the common case of :mod:`.header`);
- :mod:`.decoder`: :func:`decode` and :func:`assemble`;
- :mod:`.targets`: :func:`in_place` (and the older :func:`live_targets`), the live tensors a load can fill in place.

Called by the save path (:mod:`distckpt.saving`, :mod:`distckpt.planning`),
the load path (:mod:`distckpt.reading`, :mod:`distckpt.loading`,
:mod:`distckpt.statecheck`), :mod:`distckpt.digests`,
:mod:`distckpt.comparison`, :mod:`distckpt.coordinator` and the CLI. Nothing
here is collective.
"""

from __future__ import annotations

from .decoder import assemble, decode
from .dtypes import PART_KEY, SKELETON_KEY, flat_bytes, gc_paused, tensor_bytes
from .dtypes import SKELETON_DEPTH as SKELETON_DEPTH
from .encoded import PACK_BELOW as PACK_BELOW
from .encoded import RUN_BYTES as RUN_BYTES
from .encoded import EncodedState
from .encoder import encode, encode_leaf, state_nbytes
from .header import FileLayout, TensorEntry, header_length, parse_header
from .targets import InPlace, in_place, live_targets

# SKELETON_DEPTH, PACK_BELOW and RUN_BYTES stay importable from here, outside __all__ as before the split.
__all__ = [
    "PART_KEY",
    "SKELETON_KEY",
    "EncodedState",
    "FileLayout",
    "InPlace",
    "TensorEntry",
    "assemble",
    "decode",
    "encode",
    "encode_leaf",
    "flat_bytes",
    "gc_paused",
    "header_length",
    "in_place",
    "live_targets",
    "parse_header",
    "state_nbytes",
    "tensor_bytes",
]
