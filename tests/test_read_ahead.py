"""The shard worker's read-ahead thread: every batch once, in order; errors on either side
end both sides."""

import threading
import time

import pytest

from layerbeam.transforms.shard import read_ahead


def test_every_item_once_in_order():
    assert list(read_ahead(iter(range(100)), 2)) == list(range(100))
    assert list(read_ahead([], 2)) == []


def test_runs_ahead_of_the_consumer():
    produced = []

    def items():
        for i in range(5):
            produced.append(i)
            yield i

    it = read_ahead(items(), 2)
    assert next(it) == 0
    deadline = time.time() + 5
    while len(produced) < 3 and time.time() < deadline:  # 1 taken + 2 queued
        time.sleep(0.01)
    assert len(produced) >= 3
    assert list(it) == [1, 2, 3, 4]


def test_producer_error_is_raised_to_the_consumer():
    def items():
        yield 1
        raise ValueError("bad record 7")

    it = read_ahead(items(), 2)
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad record 7"):
        next(it)


def test_consumer_stopping_early_stops_and_closes_the_producer():
    closed = threading.Event()

    def items():
        try:
            for i in range(10_000):
                yield i
        finally:
            closed.set()

    it = read_ahead(items(), 2)
    assert next(it) == 0
    it.close()  # what a writer that failed does to its input
    assert closed.wait(5)
    assert not any(t.name == "layerbeam-read-ahead" and t.is_alive() for t in threading.enumerate())
