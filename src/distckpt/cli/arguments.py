"""Turning the command line's path arguments into checkpoints, with messages that say what a path is.

Shared by the command modules. Every file-system call goes through
:mod:`distckpt.storage`; nothing here imports torch.
"""

from __future__ import annotations

import os

from .. import legacy, storage
from ..errors import CheckpointNotFoundError, ManifestError
from ..manifest import MANIFEST_NAME, CheckpointManifest, ComponentManifest, FileEntry
from ..verification import open_checkpoint

__all__ = ["EXIT_BAD_INPUT", "EXIT_FOUND", "EXIT_OK", "CLIError", "files_of", "load_checkpoint_dir",
           "not_a_checkpoint"]

EXIT_OK = 0
EXIT_FOUND = 1
EXIT_BAD_INPUT = 2


class CLIError(Exception):
    """A problem with the command's input; printed as one message, exit status 2."""


def load_checkpoint_dir(arg: str) -> tuple[str, CheckpointManifest]:
    """Resolve a CHECKPOINT argument to its directory and parsed manifest, or raise CLIError."""
    try:
        return open_checkpoint(arg)
    except CheckpointNotFoundError as exc:
        if storage.path_info(arg).dir:  # a directory without a manifest: say what it is instead
            raise CLIError(not_a_checkpoint(arg, arg)) from None
        raise CLIError(str(exc)) from None  # "ARG: no such file or directory", "ARG: not a directory ..."
    except ManifestError as exc:
        raise CLIError(f"{arg}: corrupt or unreadable manifest: {exc}") from None


def not_a_checkpoint(arg: str, path: str) -> str:
    """Why the directory ``path`` (given as ``arg``) is not a checkpoint, and what to do with it."""
    name = os.path.basename(os.path.normpath(path))
    if legacy.is_legacy_checkpoint(path):
        return (f"{arg}: a checkpoint of the original implementation (no {MANIFEST_NAME}); "
                f"convert it with `distckpt convert {arg} NEW_CHECKPOINT_DIR`")
    if name.startswith(".") and ".staging-" in name:
        return f"{arg}: the staging directory of a save that never committed (incomplete; not a checkpoint)"
    if name.startswith(".") and ".trash-" in name:
        return f"{arg}: a checkpoint being deleted (retention or overwrite); not a checkpoint"
    if name.startswith(".") and ".replaced-" in name:
        return (f"{arg}: the old checkpoint of an interrupted overwrite=True (restored to its name by the "
                "next listing or save when that name is free)")
    if storage.path_info(os.path.join(path, "checkpoints")).dir or any(
        storage.path_info(os.path.join(path, n, MANIFEST_NAME)).file for n in storage.list_names(path)
    ):
        return f"{arg}: a directory of checkpoints, not a checkpoint; list them with `distckpt ls {arg}`"
    return f"{arg}: not a distckpt checkpoint (no {MANIFEST_NAME}; it is written last, so a save may have failed)"


def files_of(comp: ComponentManifest, rank: int) -> tuple[FileEntry, ...]:
    """The files rank ``rank`` loads for ``comp``; CLIError when the manifest has none for it."""
    try:
        return comp.files_for_rank(rank)
    except KeyError as exc:
        raise CLIError(str(exc.args[0])) from None
