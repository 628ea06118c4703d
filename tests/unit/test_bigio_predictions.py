"""The part-0 writer of a balanced write predicts its siblings' checksums in a worker thread
while its own file is written (issue 15): the predictions must equal the checksums the
siblings' writers get, a failure inside the worker must reach the caller, and a cancelled
prediction must stop without being mistaken for a result."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from distckpt import hashing, storage


def _chunks(seed: int, count: int = 40) -> list[bytes]:
    return [bytes([(seed + i + j) % 256 for j in range(i * 997 % 5000 + 1)]) for i in range(count)]


def _no_predict_worker_alive() -> bool:
    return not any(t.name == "distckpt-predict" and t.is_alive() for t in threading.enumerate())


def test_background_predictions_equal_the_checksums_of_the_written_files_in_the_order_given(tmp_path: Path) -> None:
    sources = {name: _chunks(seed) for name, seed in (("b", 1), ("a", 2), ("c", 3))}
    predicting = hashing.BackgroundChecksums([(name, lambda c=c: iter(c)) for name, c in sources.items()])
    result = predicting.result()
    assert list(result) == ["b", "a", "c"]
    for name, chunks in sources.items():
        _, written = storage.write_file(str(tmp_path / name), [memoryview(c) for c in chunks])
        assert result[name] == written == hashing.checksum_of_chunks(chunks)
    assert result["a"] != result["b"]
    assert _no_predict_worker_alive()


def test_no_sources_start_no_thread_and_give_an_empty_result() -> None:
    before = threading.active_count()
    predicting = hashing.BackgroundChecksums([])
    assert threading.active_count() == before
    assert predicting.result() == {}


def test_an_error_while_producing_chunks_in_the_worker_is_raised_by_result() -> None:
    def broken() -> Iterator[bytes]:
        yield b"first"
        raise ValueError("tensor vanished")

    predicting = hashing.BackgroundChecksums([("ok", lambda: iter([b"x"])), ("bad", broken)])
    with pytest.raises(ValueError, match="tensor vanished"):
        predicting.result()
    assert _no_predict_worker_alive()


def test_a_cancelled_prediction_stops_at_the_next_chunk_and_never_returns_a_partial_checksum() -> None:
    started, release = threading.Event(), threading.Event()
    produced: list[int] = []

    def slow() -> Iterator[bytes]:
        for i in range(1000):
            produced.append(i)
            if i == 1:
                started.set()
                release.wait(10)
            yield b"chunk"

    predicting = hashing.BackgroundChecksums([("slow", slow)])
    assert started.wait(10)
    timer = threading.Timer(0.3, release.set)  # the worker resumes only after cancel() has asked it to stop
    timer.start()
    predicting.cancel()
    timer.join()
    assert _no_predict_worker_alive()
    assert len(produced) == 2  # the chunk it was producing when asked, none after
    with pytest.raises(RuntimeError, match="cancelled"):
        predicting.result()
