"""The shard worker's extract thread (`shard._ahead`): the writer encodes one batch while
the model computes the next, memory stays bounded, and failures on either side end both
threads with the original error."""

from __future__ import annotations

import threading
import time

import pytest

from layerbeam.transforms.shard import _ahead


def test_the_producer_runs_ahead_of_a_busy_consumer_by_at_most_depth_items():
    made: list[int] = []

    def items():
        for i in range(6):
            made.append(i)
            yield i

    got = []
    with _ahead(items(), depth=2) as ahead:
        for x in ahead:
            time.sleep(0.05)  # a writer busy with the batch: the next ones are computed meanwhile
            # bounded: the item in hand, `depth` queued, one the producer holds waiting for room
            assert len(made) - len(got) <= 2 + 2
            got.append(x)
    assert got == list(range(6))


def test_work_overlaps():
    """A producer and a consumer that each take 0.1 s per item (in calls that release the
    GIL, as the model and Parquet's write_table do) finish 5 items in about 0.6 s, not 1 s."""

    def items():
        for i in range(5):
            time.sleep(0.1)
            yield i

    t = time.perf_counter()
    with _ahead(items(), depth=2) as ahead:
        for _ in ahead:
            time.sleep(0.1)
    assert time.perf_counter() - t < 0.85
    assert ahead.waited < 0.25  # only the first item was waited for


def test_a_producer_error_is_raised_in_the_consumer():
    def items():
        yield 1
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"), _ahead(items()) as ahead:
        list(ahead)


def test_a_consumer_error_stops_the_producer_and_runs_its_cleanup():
    cleaned = threading.Event()
    made = []

    def items():
        try:
            for i in range(1000):
                made.append(i)
                yield i
        finally:
            cleaned.set()

    with pytest.raises(OSError, match="disk full"), _ahead(items(), depth=2) as ahead:
        for x in ahead:
            if x == 3:
                raise OSError("disk full")
    assert cleaned.is_set()
    assert len(made) < 10
    assert not [t for t in threading.enumerate() if t.name == "layerbeam-extract"]
