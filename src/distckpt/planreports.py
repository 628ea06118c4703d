"""The plan phase's compact reports: what each rank sends in the first collective, and decoding them.

Pure (no I/O, no collective). A report is ``bytes``: three 8-byte digests
(declarations with group names, node, the rank's group keys), then varints
(each group's lowest member in name order, then per component how many
``min_part_bytes`` its state holds, for balanced writes). Built by
:func:`distckpt.planning.local_report` and :func:`with_parts` on every rank;
decoded by :func:`distckpt.planning.agree` on every rank, all at once with
NumPy (:func:`report_arrays`). Malformed reports are not an error here: the
vectorised path falls back to decoding one by one, and ``agree`` names the
ranks whose reports differ. :class:`AgreedWorld` keeps one plan phase's reports and the
topology they built, for the next save of the same coordinator.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .hashing import digest64
from .topology import Topology

__all__ = ["HEAD", "AgreedWorld", "compact", "decode_reports", "plan_vote", "read_parts", "read_vote", "report_arrays",
           "reports_key", "text_digest", "with_parts"]

#: A compact report's head: declarations digest (groups' names included), node digest and
#: :func:`~distckpt.topology.groups_digest`, 8 bytes each; varints follow.
HEAD = struct.Struct("<QQQ")


def with_parts(report: bytes, parts: Sequence[int]) -> bytes:
    """``report`` followed by ``parts`` as varints (non-negative ints, 7 bits a byte).

    Called by :func:`local_report` (group labels) and by the save's plan phase
    for balanced writes (with an empty ``report``): per component only
    ``size // min_part_bytes``, capped at the world size, decides the parts
    (:func:`distckpt.layout.part_writers`), so that is all a replica set's lowest
    rank sends (:func:`distckpt.planning.leader_part_counts`); read back by
    :func:`read_parts`.
    """
    out = bytearray(report)
    for value in parts:
        value = max(0, value)
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def read_parts(data: bytes) -> tuple[int, ...]:
    """The ints :func:`with_parts` appended to an empty report."""
    return _varints(data, 0)


_VOTE = struct.Struct("<Q")


def plan_vote(digest: int, counts: bytes) -> bytes:
    """What a rank sends in a save's second round (or with its report in the first, when it plans
    on the world it kept: :class:`AgreedWorld`): its 64-bit plan digest, then the part counts
    of :func:`distckpt.planning.leader_part_counts` (empty on most ranks), as one ``bytes``: in
    the sized rounds of large worlds every payload is padded to the longest, so each byte counts."""
    return _VOTE.pack(digest) + counts


def read_vote(vote: bytes) -> tuple[int, bytes]:
    """:func:`plan_vote`'s digest and part counts."""
    return _VOTE.unpack_from(vote)[0], vote[_VOTE.size:]


def decode_reports(reports: Sequence[bytes], names: Sequence[str]) -> tuple[
        list[int], list[tuple[int, ...]], list[int], list[tuple[int, ...]]]:
    """Compact reports -> node digests, group labels (``names`` order), groups digests, part counts."""
    g = len(names)
    if reports:
        heads, matrix = _varint_matrix(reports)
        if matrix is not None and matrix.shape[1] >= g:
            rows = matrix.tolist()
            return (heads[:, 1].tolist(), [tuple(r[:g]) for r in rows], heads[:, 2].tolist(),
                    [tuple(r[g:]) for r in rows])
    nodes, labels, digests, parts = [], [], [], []
    for rep in reports:
        _, node, digest = HEAD.unpack_from(rep)
        values = _varints(rep, HEAD.size)
        nodes.append(node)
        digests.append(digest)
        labels.append(values[:g])
        parts.append(values[g:])
    return nodes, labels, digests, parts


def report_arrays(reports: Sequence[bytes], names: Sequence[str]) -> tuple[
        np.ndarray, Sequence[str], np.ndarray, np.ndarray]:
    """Compact reports as arrays for :meth:`Topology.from_label_arrays`: node digests, group labels
    (one row per rank, ``names`` order), groups digests. Vectorised; :func:`_varint_matrix` decodes."""
    heads, values = _varint_matrix(reports)
    if values is None or values.shape[1] < len(names):
        labels = [_varints(r, HEAD.size)[:len(names)] for r in reports]
        values = np.array([[*row, *[-1] * (len(names) - len(row))] for row in labels], dtype=np.int64)
    return heads[:, 1], names, values[:, :len(names)].reshape(len(reports), len(names)), heads[:, 2]


def _varint_matrix(reports: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
    """Every report's head (world x 3, uint64) and varints (world x count, int64), decoded at once;
    ``None`` for the varints unless every report holds the same number of well-formed ones (of at
    most 63 bits). Reports are at least a head long (:func:`agree` checks)."""
    world = len(reports)
    lengths = np.fromiter(map(len, reports), dtype=np.int64, count=world)
    blob = np.frombuffer(b"".join(reports), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    in_head = (starts[:, None] + np.arange(HEAD.size)).ravel()
    heads = blob[in_head].copy().view("<u8").reshape(world, 3)
    tail_lengths = lengths - HEAD.size
    if world and not bool(tail_lengths.any()):  # no groups: no varints anywhere
        return heads, np.zeros((world, 0), dtype=np.int64)
    if world == 0 or not bool((tail_lengths > 0).all()):
        return heads, None
    tail_mask = np.ones(len(blob), dtype=bool)
    tail_mask[in_head] = False
    tail = blob[tail_mask]
    ends = (tail & 0x80) == 0
    offsets = np.cumsum(tail_lengths) - tail_lengths
    per_report = np.add.reduceat(ends.astype(np.int64), offsets)
    count = int(per_report[0])
    first_of_value = np.concatenate(([True], ends[:-1]))
    value_of = np.cumsum(first_of_value) - 1
    shift = np.arange(len(tail)) - np.flatnonzero(first_of_value)[value_of]
    if not (bool(ends[offsets + tail_lengths - 1].all()) and bool((per_report == count).all())
            and int(shift.max()) <= 8):
        return heads, None
    values = np.zeros(int(value_of[-1]) + 1, dtype=np.int64)
    np.add.at(values, value_of, (tail & 0x7F).astype(np.int64) << (7 * shift))
    return heads, values.reshape(world, count)


def _varints(data: bytes, start: int) -> tuple[int, ...]:
    out: list[int] = []
    value = shift = 0
    for byte in data[start:]:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            out.append(value)
            value = shift = 0
    return tuple(out)


def text_digest(text: str) -> int:
    return digest64(text.encode("utf-8", "backslashreplace"))


@dataclass(frozen=True)
class AgreedWorld:
    """The compact reports every rank sent in a save's plan phase, and the topology they built.

    Kept by a coordinator after each plan phase that succeeded, and handed to the next save's
    (:func:`distckpt.saving.plan`). While this rank's report and group names are unchanged
    (:meth:`guess`) it plans its files on :attr:`topology` before the first round and sends the
    vote with its report, along with :attr:`key`; the guess holds only when every rank sent the
    key of the reports gathered in that round and rank 0 could allocate the target (its folder
    exists), which every rank checks on the same bytes. Pure; the reports are checked only by
    their bytes (the declarations, node and groups travel in them as digests).
    """

    reports: tuple[bytes, ...]
    names: tuple[str, ...]
    topology: Topology

    def __post_init__(self) -> None:
        if not compact(self.reports):
            raise TypeError("AgreedWorld needs every rank's compact report, as bytes")
        if len(self.reports) != self.topology.world_size:
            raise ValueError(f"{len(self.reports)} reports for a topology of {self.topology.world_size} ranks")

    @property
    def key(self) -> int:
        """A 64-bit digest of the reports, in rank order."""
        return reports_key(self.reports)

    def guess(self, rank: int, report: bytes, names: Sequence[str]) -> Topology | None:
        """:attr:`topology` when ``rank``'s ``report`` and group ``names`` are those it sent
        last time, else ``None``."""
        same = rank < len(self.reports) and self.reports[rank] == report and tuple(names) == self.names
        return self.topology if same else None


def compact(reports: Sequence[Any]) -> bool:
    """Whether ``reports`` are compact ones (``bytes`` each, at least one): what an :class:`AgreedWorld`
    keeps and :func:`reports_key` digests. Called by the save's plan phase on the gathered reports."""
    return bool(reports) and all(isinstance(r, bytes) for r in reports)


def reports_key(reports: Sequence[bytes]) -> int:
    """A 64-bit digest of compact reports in rank order (each one's length, then its bytes)."""
    return digest64(b"".join(len(r).to_bytes(4, "little") + r for r in reports))
