"""``distckpt convert --to-torch FILE --rank R CHECKPOINT``: one rank's view as a single torch.save file.

Reads (and verifies) the files rank ``R`` would load, and writes
``{component: state}`` with ``torch.save`` through a temporary file, so
``FILE`` is replaced whole or not at all. Imports torch only when it runs.
"""

from __future__ import annotations

import argparse
import os
from typing import IO, Any

from .. import storage
from ..errors import CheckpointError
from .arguments import EXIT_OK, CLIError, files_of, load_checkpoint_dir
from .formatting import short

__all__ = ["run"]


def _clone_tree(obj: Any, found_numpy: list[bool]) -> Any:
    """Copy tensors out of the file buffer so each is saved with just its own storage."""
    import numpy as np
    import torch

    from ..dtensor import SavedDTensor

    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, SavedDTensor):  # a DTensor: this rank's view is its shard
        return obj.local.clone()
    if isinstance(obj, (np.ndarray, np.generic)):
        found_numpy[0] = True
        return obj
    if isinstance(obj, dict):
        copy = type(obj)((k, _clone_tree(v, found_numpy)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata  # type: ignore[attr-defined]
        return copy
    if isinstance(obj, list):
        return [_clone_tree(v, found_numpy) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v, found_numpy) for v in obj)
    return obj


def run(args: argparse.Namespace) -> int:
    """Export and print; the exit status. Called by :func:`distckpt.cli.convert.run` for ``--to-torch``;
    bad input or an unreadable file raises ``CLIError``; ``FILE`` is then left as it was.
    """
    import torch

    from ..reading import read_component

    if len(args.paths) != 1:
        raise CLIError("--to-torch FILE takes exactly one CHECKPOINT")
    if args.rank is None:
        raise CLIError("--to-torch needs --rank R: the rank whose view to export")
    path, m = load_checkpoint_dir(args.paths[0])
    rank: int = args.rank
    if not 0 <= rank < m.world_size:
        raise CLIError(f"--rank {rank}: the checkpoint was saved by a world of {m.world_size} ranks (0-{m.world_size - 1})")
    target = os.path.abspath(args.to_torch)
    if storage.path_info(target).exists and not args.force:
        raise CLIError(f"{args.to_torch}: already exists (pass --force to replace it)")
    found_numpy = [False]
    out: dict[str, Any] = {}
    used: dict[str, str] = {}
    for key in sorted(m.components):
        group = files_of(m.components[key], rank)
        entry = group[0]
        try:
            out[key] = _clone_tree(read_component(path, list(group)), found_numpy)
        except CheckpointError as exc:
            raise CLIError(f"cannot read {entry.path}: {exc}") from None
        used[key] = entry.path

    def fill(f: IO[bytes]) -> None:
        torch.save(out, f)

    storage.write_through_temp(target, fill)
    print(f"wrote {short(target)}: rank {rank}'s view of {short(path)} ({len(out)} components: "
          + ", ".join(f"{k} <- {v}" for k, v in used.items()) + ")")
    if found_numpy[0]:
        print("note: it holds NumPy values (e.g. RNG state); torch.load(weights_only=True) needs them allowed "
              "with torch.serialization.safe_globals, or load a file you trust with weights_only=False")
    return EXIT_OK
