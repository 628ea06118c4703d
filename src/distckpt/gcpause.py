"""Pausing the cyclic garbage collector while many small objects are built.

Pure and torch-free, so the manifest (which the quick CLI commands import
without torch) can use it. Called by the codec, the manifest, the planner and
the async snapshot copy around loops that allocate thousands of objects none
of which is in a cycle; not collective; never raises on its own.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["gc_paused"]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects (halves encode/decode time
    for states of thousands of tensors); restores whatever state it found."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
