"""Reading ahead in a thread: same items, same errors, bounded, and stopped when dropped."""

from __future__ import annotations

import threading
import time

import pytest

from cil_dist.data.prefetch import read_ahead


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "read-ahead"]


@pytest.mark.parametrize("depth", [0, 1, 3, 100])
def test_yields_the_items_in_order(depth):
    assert list(read_ahead(lambda: range(50), depth)) == list(range(50))


def test_depth_zero_runs_in_the_calling_thread():
    threads = []

    def produce():
        threads.append(threading.current_thread())
        yield 1

    assert list(read_ahead(produce, 0)) == [1]
    assert threads == [threading.current_thread()]


def test_an_error_arrives_after_the_items_before_it():
    def produce():
        yield from (1, 2)
        raise OSError("shard x: connection reset")

    got = []
    with pytest.raises(OSError, match="shard x: connection reset"):
        for item in read_ahead(produce, 4):
            got.append(item)
    assert got == [1, 2]


def test_reads_at_most_depth_items_ahead():
    produced = []

    def produce():
        for i in range(1000):
            produced.append(i)
            yield i

    items = read_ahead(produce, 3)
    assert next(items) == 0
    for _ in range(100):  # let the reader run until the queue is full
        time.sleep(0.01)
    # one item taken, three queued, one more read and waiting for room
    assert len(produced) <= 1 + 3 + 1
    items.close()


def test_closing_early_stops_the_thread_and_closes_the_source():
    closed = threading.Event()

    def produce():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    items = read_ahead(produce, 2)
    assert [next(items) for _ in range(5)] == list(range(5))
    items.close()
    assert closed.is_set()
    assert not reader_threads()
