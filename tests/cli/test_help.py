"""Every subcommand's --help names its arguments (issue 14 item 8: ``convert --help``)."""

from __future__ import annotations

import argparse

import pytest

from distckpt.cli import build_parser, main


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", ["ls", "inspect", "verify", "diff", "convert"])
def test_every_argument_of_every_command_has_a_help_string(command: str) -> None:
    missing = [a.dest for a in subparsers()[command]._actions if not a.help]
    assert missing == []


def test_convert_help_says_what_its_paths_are(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "PATH [PATH ...]" in out or "SRC DST" in out
    for words in ("original-format checkpoint directory", "new checkpoint directory to create",
                  "the one CHECKPOINT to export", "--world-size N", "--rank R"):
        assert words in out
