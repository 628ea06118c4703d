"""Checkpoint directories and their manifest files.

Joining manifest paths safely under a checkpoint directory, creating
component directories in a staging directory, listing what a manifest does
not, retiring a committed checkpoint, and the manifest file's read and
atomic write. Callers: :mod:`distckpt.saving` and the CLI's convert
(:func:`make_component_dir`), :mod:`distckpt.folder` (:func:`staging_prefix`,
:func:`safe_join`), :mod:`distckpt.reading`, :mod:`distckpt.verification` and
:mod:`distckpt.comparison` (:func:`safe_join`), :mod:`distckpt.loading`
(:func:`unlisted_files`), :mod:`distckpt.series` (:func:`remove_checkpoint`),
and :class:`~distckpt.manifest.CheckpointManifest`, whose ``load`` and
``save`` are bound to :func:`read_manifest_file` and :func:`write_manifest_file`
when this module is imported (importing :mod:`distckpt.storage` does). Not
collective. Errors: :class:`IntegrityError` / :class:`ManifestError` naming
the path, else ``OSError``.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Iterable

from .. import manifest as _manifest
from ..errors import IntegrityError, ManifestError
from ..layout import check_relpath
from ..manifest import MANIFEST_NAME
from .posix import TooLarge, fsync_dir, read_bounded
from .reader import _open_regular
from .writer import atomic_write_bytes


def read_manifest_bytes(path: str) -> bytes:
    """Read a manifest file; :class:`ManifestError` naming ``path`` if missing, a symlink or too large."""
    try:
        fd = _open_regular(path, "manifest")
    except IntegrityError as exc:
        raise ManifestError(str(exc)) from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    try:
        limit = _manifest.MAX_MANIFEST_BYTES  # looked up here: tests lower it on the manifest module
        return read_bounded(fd, limit)
    except TooLarge as exc:
        held = "" if exc.size is None else f"{exc.size} bytes is "  # None: grew while being read
        raise ManifestError(f"{path}: {held}larger than the {limit}-byte limit") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    finally:
        os.close(fd)



def require_real_dir(path: str, what: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` is a directory and not a symlink."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise IntegrityError(f"{path}: {what} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise IntegrityError(f"{path}: {what} is not a directory")


def safe_join(root: str, relpath: str) -> str:
    """Join a manifest path to a checkpoint directory, refusing escapes and symlinked directories."""
    try:
        check_relpath(relpath)
    except ValueError as exc:
        raise IntegrityError(f"{root}: {exc}") from None
    key_dir = os.path.join(root, relpath.split("/")[0])
    if os.path.lexists(key_dir):
        require_real_dir(key_dir, "component directory")
    return os.path.join(root, relpath)


def staging_prefix(final: str) -> str:
    """Name prefix of the staging directories of ``final`` (hidden, beside it)."""
    return f".{os.path.basename(final)}.staging-"


def make_component_dir(staging: str, key: str) -> str:
    """Create (race-free between ranks) and check ``<staging>/<key>``."""
    require_real_dir(staging, "staging directory")
    path = os.path.join(staging, key)
    os.makedirs(path, exist_ok=True)
    require_real_dir(path, "component directory")
    return path


def remove_checkpoint(path: str) -> None:
    """Retire a committed checkpoint: rename it out of sight first, then delete it."""
    parent = os.path.dirname(os.path.abspath(path))
    trash = os.path.join(parent, f".{os.path.basename(path)}.trash-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash)


def unlisted_files(root: str, listed: Iterable[str]) -> list[str]:
    """Entries under a checkpoint directory that its manifest does not list (relative paths).

    Looks one level into component directories; ``manifest.json`` counts as listed.
    """
    known = set(listed) | {MANIFEST_NAME}
    key_dirs = {p.split("/", 1)[0] for p in known}
    extra = []
    for name in sorted(os.listdir(root)):
        full = os.path.join(root, name)
        if name in key_dirs and os.path.islink(full):
            continue  # a listed component's directory: reading it refuses the symlink by name
        if os.path.isdir(full) and not os.path.islink(full):
            extra += [f"{name}/{inner}" for inner in sorted(os.listdir(full)) if f"{name}/{inner}" not in known]
        elif name not in known:
            extra.append(name)
    return extra



def manifest_file(path: str) -> str:
    """The manifest file of ``path``: ``<path>/manifest.json`` for a directory, else ``path`` itself."""
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def read_manifest_file(path: str) -> tuple[bytes, str]:
    """Bytes of the manifest of ``path`` (a checkpoint directory or a manifest file) and the file's
    path; :class:`ManifestError` naming it if missing, a symlink or too large. Bound to
    :meth:`CheckpointManifest.load`."""
    target = manifest_file(path)
    return read_manifest_bytes(target), target


def write_manifest_file(path: str, data: bytes) -> None:
    """Write manifest bytes atomically into ``path`` (a checkpoint directory or a file path).
    Bound to :meth:`CheckpointManifest.save`."""
    atomic_write_bytes(manifest_file(path), data)


_manifest.bind_files(read_manifest_file, write_manifest_file)
