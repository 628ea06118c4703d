"""Fixtures shared by every test directory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def world_pool() -> Iterator[object]:
    """One pool of warm rank processes for the whole session (torch imported once)."""
    from distckpt.testing.pool import WorldPool

    with WorldPool(max_ranks=32) as p:  # processes start lazily, as a world needs them
        yield p


@pytest.fixture
def held_copy(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Every asynchronous save's host copy waits for the returned event before copying (so a test
    can act while a save staged in the background is still staging); set at the end of the test
    in any case."""
    from distckpt.hostcopy import StateCopy

    gate = threading.Event()
    fill = StateCopy.fill

    def held(self: StateCopy, only: Any = None) -> None:
        assert gate.wait(20), "the test never opened the gate"
        fill(self, only)

    monkeypatch.setattr(StateCopy, "fill", held)
    yield gate
    gate.set()
