"""Storage: the only part of distckpt that touches the file system.

Every write lands first in a staging directory or a temporary file beside its
final name, is hashed while written, fsynced, and made visible by a rename
followed by an fsync of the parent directory. Reads refuse symlinks and
anything but regular files (a FIFO never blocks), and verify size and checksum
before anything is parsed. A folder of checkpoints is shared safely between
saves, of one job or several: naming, commit and cleanup run under the folder
lock, and a staging directory is removed only once its owner is gone
(:mod:`distckpt.folder`, :mod:`distckpt.locks`; both reach the disk only
through :mod:`.posix`, the one place that knows POSIX details: the seam a
second backend would plug into). Nothing here is collective; the save and load
phases decide which rank calls what.

The package is one module per concept; callers use the names re-exported here
(``storage.write_runs``, ``from distckpt.storage import write_file``):

- :mod:`.posix`: descriptors, ``flock``, ``renameat2``, writeback hints, listing, renaming, removing;
- :mod:`.writer`: writing checkpoint files (the save path) and small files atomically;
- :mod:`.reader`: verified reads (the load path);
- :mod:`.directories`: checkpoint directories and manifest files;
- :mod:`.inspection`: the file checks of the CLI and the offline tools.

Called by: the save phases (:mod:`distckpt.saving`: component files, fsyncs),
the load phases (:mod:`distckpt.loading`, :mod:`distckpt.reading`: verified
reads), :mod:`distckpt.folder`, :mod:`distckpt.locks` and
:mod:`distckpt.series` (the folder of checkpoints), the CLI, and
:class:`~distckpt.manifest.CheckpointManifest` (``load``/``save``, bound on
import: :func:`read_manifest_file`, :func:`write_manifest_file`). torch is
imported lazily, inside the functions that need it.
"""

from __future__ import annotations

from ..hashing import (
    CHECKSUM_ALGORITHM,
    PipelinedHasher,
    checksum_of,
    checksum_of_chunks,
    new_hasher,
)
from ..manifest import MANIFEST_NAME as MANIFEST_NAME
from ..manifest import MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from .directories import (
    make_component_dir,
    manifest_file,
    read_manifest_bytes,
    read_manifest_file,
    remove_checkpoint,
    require_real_dir,
    safe_join,
    staging_prefix,
    unlisted_files,
    write_manifest_file,
)
from .inspection import (
    FileFault,
    PathInfo,
    check_file,
    discard_stdout,
    list_names,
    list_regular_files,
    open_regular_stream,
    path_info,
    read_small_file,
    write_through_temp,
)
from .posix import (
    close_fd,
    create_exclusive_fd,
    file_identity,
    fsync_dir,
    list_dir,
    make_dir,
    make_dirs,
    open_dir_fd,
    open_lock_file,
    open_regular_fd,
    read_at,
    regular_file_size,
    remove_entry,
    remove_file,
    remove_tree,
    rename,
    rename_exchange,
    rename_noreplace,
    try_flock,
    write_all,
)
from .reader import VerifiedReader, open_regular_file, read_prefix, read_verified
from .writer import Run, atomic_write_bytes, write_file, write_runs

# MANIFEST_NAME and MAX_MANIFEST_BYTES stay importable from here, as before the split.
__all__ = [
    "CHECKSUM_ALGORITHM",
    "FileFault",
    "PathInfo",
    "PipelinedHasher",
    "Run",
    "VerifiedReader",
    "atomic_write_bytes",
    "check_file",
    "checksum_of",
    "checksum_of_chunks",
    "close_fd",
    "create_exclusive_fd",
    "discard_stdout",
    "file_identity",
    "fsync_dir",
    "list_dir",
    "list_names",
    "list_regular_files",
    "make_component_dir",
    "make_dir",
    "make_dirs",
    "manifest_file",
    "new_hasher",
    "open_dir_fd",
    "open_lock_file",
    "open_regular_fd",
    "open_regular_file",
    "open_regular_stream",
    "path_info",
    "read_at",
    "read_manifest_bytes",
    "read_manifest_file",
    "read_prefix",
    "read_small_file",
    "read_verified",
    "regular_file_size",
    "remove_checkpoint",
    "remove_entry",
    "remove_file",
    "remove_tree",
    "rename",
    "rename_exchange",
    "rename_noreplace",
    "require_real_dir",
    "safe_join",
    "staging_prefix",
    "try_flock",
    "unlisted_files",
    "write_all",
    "write_file",
    "write_manifest_file",
    "write_runs",
    "write_through_temp",
]
