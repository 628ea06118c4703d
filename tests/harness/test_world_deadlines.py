"""The world deadline holds whatever a rank does: stuck in teardown, frozen, or abandoned."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from distckpt.testing import probes
from distckpt.testing._channel import CLOSED, Channel
from distckpt.testing.pool import WorldPool, WorldSpec, WorldTimeout

# Far larger than a socket pair's buffers: a send of it blocks until the peer reads.
BIG = b"x" * (4 << 20)


class Abandoned(Exception):
    """Raised in the test process to abandon a world mid-way (as a test timeout does)."""


def _state(pid: int) -> str:
    """The process state letter from /proc (``T`` for stopped), ``""`` once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return text.rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(120)
def test_a_rank_that_blocks_forever_in_teardown_fails_the_world_with_its_stack_within_the_deadline(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=3)
    start = time.monotonic()
    with pytest.raises(WorldTimeout) as info:
        world_pool.run(spec, probes.hang_in_teardown, [1], timeout=3.0)
    assert time.monotonic() - start < 15
    err = info.value
    assert sorted(err.stacks) == [1]
    assert "_block_in_teardown" in err.stacks[1] and "destroy_process_groups" in err.stacks[1]
    assert [o.value if o else None for o in err.outcomes] == [0, None, 2]
    assert world_pool.run_ok(spec, probes.all_reduce_rank) == [3.0] * 3


@pytest.mark.timeout(120)
def test_a_frozen_rank_fails_the_next_world_within_its_deadline_while_the_parent_sends_it_megabytes(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=3)
    pids = world_pool.run_ok(spec, probes.freeze_when_idle, [1])
    waited = time.monotonic()
    while _state(pids[1]) != "T":
        assert time.monotonic() - waited < 30, "the probe never stopped its process"
        time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(WorldTimeout) as info:
        world_pool.run(spec, probes.payload_size, BIG, timeout=4.0)
    assert time.monotonic() - start < 20
    err = info.value
    assert 1 in err.stacks
    assert "could not deliver the world to ranks [1]" in str(err)
    assert _state(pids[1]) == ""  # killed, not left stopped
    assert world_pool.run_ok(spec, probes.payload_size, BIG) == [len(BIG)] * 3


@pytest.mark.timeout(120)
def test_a_world_abandoned_by_its_caller_leaves_no_busy_rank_to_block_the_next_world(
    world_pool: WorldPool,
) -> None:
    spec = WorldSpec(nodes=1, procs_per_node=3)
    before = world_pool.run_ok(spec, probes.environment)

    def abandon(signum: int, frame: Any) -> None:
        raise Abandoned

    previous = signal.signal(signal.SIGUSR2, abandon)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        timer.start()
        with pytest.raises(Abandoned):
            world_pool.run(spec, probes.hang_on, [0], timeout=60.0)
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)
    start = time.monotonic()
    assert world_pool.run_ok(spec, probes.payload_size, BIG, timeout=30.0) == [len(BIG)] * 3
    assert time.monotonic() - start < 30
    assert before[0]["pid"] not in world_pool.pids  # the sleeping rank was replaced


def _socket_pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    return Connection(ours.detach()), theirs


@pytest.mark.timeout(60)
def test_a_send_to_a_pipe_nobody_reads_gives_up_at_its_deadline_and_close_frees_it() -> None:
    import queue

    conn, peer = _socket_pair()
    inbox: queue.Queue[tuple[int, Any]] = queue.Queue()
    channel = Channel(conn, 7, inbox)
    try:
        start = time.monotonic()
        assert channel.send_now(BIG, timeout=0.5) is False
        assert time.monotonic() - start < 5
        assert not channel.sent()
        with pytest.raises(RuntimeError, match="previous send"):
            channel.start_send(b"next")
    finally:
        channel.close()
        peer.close()
    assert channel.sent()
    assert inbox.get(timeout=5) == (7, CLOSED)


@pytest.mark.timeout(60)
def test_messages_from_a_rank_arrive_in_the_inbox_with_the_channel_key() -> None:
    import queue

    conn, peer = _socket_pair()
    inbox: queue.Queue[tuple[int, Any]] = queue.Queue()
    channel = Channel(conn, 3, inbox)
    sender = Connection(peer.detach())
    try:
        sender.send(("done", "w1", {"ok": True}))
        assert inbox.get(timeout=5) == (3, ("done", "w1", {"ok": True}))
        assert channel.send_now(("run", "w2"), timeout=5)
        assert sender.recv() == ("run", "w2")
        sender.close()
        assert inbox.get(timeout=5) == (3, CLOSED)
    finally:
        channel.close()
