"""The error protocol: collectives that carry errors, so that no rank waits on a peer that failed.

:func:`exchange` is the only collective pattern the coordinator uses: every
rank runs its local work, catches its own exception, and all-gathers either
its result or its error. If any rank failed, every rank raises the same
:class:`~distckpt.errors.CheckpointError` subclass with ``failures: {rank:
message}``. A peer that died or never arrived surfaces as
:class:`~distckpt.errors.CollectiveTimeoutError` naming it, within the timeout.

A failing rank's formatted traceback travels with its failure; every rank
that raises the merged error logs its peers' tracebacks on the ``distckpt``
logger at DEBUG (a peer's stack is otherwise only in that peer's own log).

Called by the save and load phases (:mod:`distckpt.saving`,
:mod:`distckpt.validation`, :mod:`distckpt.loading`). How objects travel is
:mod:`distckpt.transport`'s business (the :class:`~distckpt.transport.Comm`
protocols, :class:`~distckpt.transport.LocalComm`, :func:`default_comm`)
and :mod:`distckpt.torchcomm`'s (gloo groups of distckpt's own, so an NCCL
training job works too and the trainer's collectives never interleave with
ours); their names are re-exported here for older imports.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .errors import (
    ArgumentMismatchError,
    CheckpointError,
    CrossRankError,
    error_class_by_name,
    group_ranks,
    rank_span,
)
from .hashing import digest64
from .transport import (
    Comm,
    ForkingComm,
    LocalComm,
    SetBroadcastComm,
    TorchComm,
    default_comm,
    local_node_id,
)

__all__ = [
    "Comm",
    "ForkingComm",
    "LocalComm",
    "SetBroadcastComm",
    "TorchComm",
    "announce",
    "default_comm",
    "describe_exception",
    "exchange",
    "local_node_id",
]

log = logging.getLogger("distckpt")
T = TypeVar("T")
#: At most this many characters of one rank's traceback travel to its peers.
TRACEBACK_LIMIT = 8000


def describe_exception(exc: BaseException) -> str:
    """One line for ``failures``: the class and message (errno included for OSError)."""
    if isinstance(exc, CheckpointError):
        text = exc.message
        groups = group_ranks(exc.failures)
        if groups and not (len(groups) == 1 and groups[0][1] in text):
            text += " (" + "; ".join(f"{rank_span(r)}: {m}" for r, m in groups) + ")"
        return f"{type(exc).__name__}: {text}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def exchange(
    comm: Comm,
    phase: str,
    work: Callable[[], T],
    *,
    agree: Mapping[str, Any] | None = None,
    note: Callable[[], str] | None = None,
) -> list[T]:
    """Collective: run ``work`` locally, then all-gather results or errors.

    Every rank returns the list of every rank's result, or every rank raises
    the same error: the common :class:`CheckpointError` subclass of the
    failing ranks' errors (``CrossRankError`` when they differ or are not
    ours), with ``failures`` naming each failing rank.

    ``agree``: this rank's arguments of the call (name -> comparable value),
    sent along whatever ``work`` did; if any differ across ranks, every rank
    raises :class:`ArgumentMismatchError` naming the argument and the odd
    ranks, before any error of ``work``. ``note``: called after ``work``
    (whether it succeeded or not) for a line this rank adds to the error of a
    failed exchange (e.g. what it changed before the failure).

    Any ``BaseException`` of ``work`` (``KeyboardInterrupt``, ``SystemExit``)
    is reported to the peers first, then re-raised here unchanged, so the
    peers raise at once instead of waiting for the timeout.
    """
    interrupted: BaseException | None = None
    try:
        status: tuple[Any, ...] = ("ok", work())
    except BaseException as exc:  # reported to every rank below; non-Exceptions re-raised after
        log.debug("distckpt: rank %d failed in %s", comm.rank, phase, exc_info=True)
        status = ("error", type(exc).__name__, describe_exception(exc), _formatted(exc))
        if not isinstance(exc, Exception):
            interrupted = exc
    # The arguments travel as a digest (a few bytes per rank, whatever their size); only when
    # the digests differ does a second round carry the arguments themselves, to name them.
    extra = (_args_digest(agree) if agree is not None else None, _noted(note))
    try:
        gathered = comm.all_gather((*status, extra), phase)
    finally:
        if interrupted is not None:
            raise interrupted
    if len({s[-1][0] for s in gathered if s[-1][0] is not None}) > 1:
        full = comm.all_gather(dict(agree) if agree is not None else None, phase)
        mismatch = argument_mismatch(phase, {r: a for r, a in enumerate(full) if a is not None})
        if mismatch is not None:
            raise mismatch
    failures = {r: s[2] for r, s in enumerate(gathered) if s[0] == "error"}
    if failures:
        notes = {r: s[-1][1] for r, s in enumerate(gathered) if s[-1][1]}
        _log_peer_tracebacks(comm.rank, phase, {r: s[3] for r, s in enumerate(gathered) if s[0] == "error"})
        raise merged_error(phase, failures, {s[1] for s in gathered if s[0] == "error"}, notes)
    return [s[1] for s in gathered]


def _formatted(exc: BaseException) -> str:
    """``exc``'s formatted traceback, for its peers (at most :data:`TRACEBACK_LIMIT` characters, the end kept)."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception as failure:  # a traceback that cannot be formatted never hides the error
        text = f"(traceback unavailable: {type(failure).__name__})"
    return text if len(text) <= TRACEBACK_LIMIT else "...\n" + text[-TRACEBACK_LIMIT:]


def _log_peer_tracebacks(rank: int, phase: str, tracebacks: Mapping[int, str]) -> None:
    """Log, at DEBUG, the tracebacks of the peers whose failure this rank is about to raise."""
    for peer, text in sorted(tracebacks.items()):
        if peer != rank:
            log.debug("distckpt: rank %d failed in %s; its traceback:\n%s", peer, phase, text)


def _noted(note: Callable[[], str] | None) -> str:
    if note is None:
        return ""
    try:
        return note()
    except Exception as exc:  # a note never hides the error it annotates
        return f"(note failed: {type(exc).__name__}: {exc})"


def _args_digest(args: Mapping[str, Any]) -> int:
    """A 64-bit digest of a call's arguments (their ``repr``, sorted by name)."""
    return digest64(repr(sorted(args.items())).encode("utf-8", "backslashreplace"))


def announce(comm: Comm, phase: str, work: Callable[[], T]) -> T:
    """Collective: rank 0 runs ``work`` and broadcasts its result or error.

    For steps only rank 0 performs (publishing a commit, resolving a path):
    cheaper than an all-gather, and the payload is not padded to every rank.
    Every rank returns rank 0's result or raises the same error. A
    ``BaseException`` on rank 0 is broadcast first, then re-raised there.
    """
    status: tuple[Any, ...] | None = None
    interrupted: BaseException | None = None
    if comm.rank == 0:
        try:
            status = ("ok", work())
        except BaseException as exc:  # reported to every rank below; non-Exceptions re-raised after
            log.debug("distckpt: rank 0 failed in %s", phase, exc_info=True)
            status = ("error", type(exc).__name__, describe_exception(exc), _formatted(exc))
            if not isinstance(exc, Exception):
                interrupted = exc
    try:
        status = comm.broadcast(status, phase)
    finally:
        if interrupted is not None:
            raise interrupted
    assert status is not None
    if status[0] == "error":
        _log_peer_tracebacks(comm.rank, phase, {0: status[3]})
        raise merged_error(phase, {0: status[2]}, {status[1]})
    result: T = status[1]
    return result


def argument_mismatch(phase: str, args: Mapping[int, Mapping[str, Any]]) -> ArgumentMismatchError | None:
    """The error for per-call arguments that differ across ranks, or ``None``. Deterministic.

    The value most ranks passed (ties: the one rank 0's side passed) is the
    reference; ``failures`` names every rank that passed something else.
    """
    failures: dict[int, str] = {}
    lines = []
    names = sorted({name for a in args.values() for name in a})
    for name in names:
        by_value: dict[str, list[int]] = {}
        for rank in sorted(args):
            by_value.setdefault(repr(args[rank].get(name)), []).append(rank)
        if len(by_value) < 2:
            continue
        reference = max(by_value, key=lambda v: (len(by_value[v]), -by_value[v][0]))
        for value, ranks in by_value.items():
            if value == reference:
                continue
            for rank in ranks:
                failures[rank] = "; ".join(filter(None, [
                    failures.get(rank), f"passed {name}={value} where ranks {by_value[reference]} passed {reference}"]))
        lines.append(f"{name}: " + ", ".join(f"ranks {r} passed {v}" for v, r in by_value.items()))
    if not failures:
        return None
    return ArgumentMismatchError(
        f"checkpoint {phase}: ranks passed different arguments to the same call (every rank must pass "
        "the same; nothing was written):\n  " + "\n  ".join(lines),
        failures=failures, phase=phase,
    )


def merged_error(phase: str, failures: Mapping[int, str], class_names: set[str],
                 notes: Mapping[int, str] | None = None) -> CheckpointError:
    """The error every rank raises for ``failures`` (deterministic on every rank).

    ``notes``: per-rank lines appended to the message (what each rank changed).
    """
    cls: type[CheckpointError] = CrossRankError
    if len(class_names) == 1:
        cls = error_class_by_name(next(iter(class_names))) or CrossRankError
    groups = group_ranks(failures)
    if len(groups) == 1:
        message = f"checkpoint {phase} failed on {rank_span(failures)}: {groups[0][1]}"
    else:
        message = f"checkpoint {phase} failed on {rank_span(failures)} ({len(groups)} different errors):"
    if notes:
        message += "".join(f"\n  {rank_span(ranks)} {note}" for ranks, note in group_ranks(notes))
    return cls(message, failures=failures, phase=phase)
