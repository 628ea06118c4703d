"""The ``distckpt`` command line: look at, check, compare and convert checkpoints.

Subcommands (every one reads only; ``convert`` writes a new checkpoint and
never touches its source)::

    distckpt ls OUTPUT_DIR                 checkpoints oldest to newest, latest marked
    distckpt inspect CHECKPOINT [--json]   components, patterns, writers, files, topology
    distckpt verify CHECKPOINT             every size and checksum against the manifest
    distckpt diff A B                      components, entries and tensors that differ
    distckpt convert SRC DST               original-format checkpoint -> distckpt format
    distckpt convert --to-torch FILE --rank R CHECKPOINT
                                           one rank's view as a single torch.save file

Exit status: 0 success (``verify``: intact; ``diff``: no difference), 1 the
check ran and found a problem (``verify``: damage; ``diff``: differences),
2 bad input (missing path, not a checkpoint, corrupt manifest, bad option).

One module per command (``ls``, ``inspect``, ``verify``, ``diff``,
``convert`` with ``export``), each over library functions users can call too
(:func:`distckpt.verify_checkpoint`, :func:`distckpt.diff_checkpoints`,
:func:`distckpt.legacy.plan_conversion`); shared text in ``formatting``, path
arguments in ``arguments``. This module parses the command line and
dispatches. torch is imported only by the commands that decode tensors
(``diff``, ``convert``), so ``--version``, ``ls``, ``inspect`` and ``verify``
start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from .. import storage
from ..errors import CheckpointError
from ..version import __version__
from . import convert, diff, inspect, ls, verify
from .arguments import EXIT_BAD_INPUT, EXIT_FOUND, EXIT_OK, CLIError

__all__ = ["EXIT_BAD_INPUT", "EXIT_FOUND", "EXIT_OK", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand (each command module adds its own)."""
    parser = argparse.ArgumentParser(
        prog="distckpt",
        description="Look at, check, compare and convert distckpt checkpoints.",
        epilog="Exit status: 0 success; 1 verify found damage or diff found differences; 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"distckpt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (ls, inspect, verify, diff, convert):
        command.add_parser(sub)
    return parser


class _Logging:
    """Route the library's logger to stderr for the duration of one command."""

    def __init__(self, verbosity: int) -> None:
        self.logger = logging.getLogger("distckpt")
        self.level = logging.WARNING if verbosity <= 0 else (logging.INFO if verbosity == 1 else logging.DEBUG)
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(message)s"))

    def __enter__(self) -> None:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.level)
        self.logger.propagate = False

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 problem found, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    with _Logging(args.verbose):
        try:
            return func(args)
        except CLIError as exc:
            print(f"distckpt {args.command}: error: {exc}", file=sys.stderr)
        except CheckpointError as exc:
            print(f"distckpt {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                storage.discard_stdout()
                return 141
            print(f"distckpt {args.command}: error: {exc}", file=sys.stderr)
        except KeyboardInterrupt:
            print(f"distckpt {args.command}: interrupted", file=sys.stderr)
            return 130
    return EXIT_BAD_INPUT
