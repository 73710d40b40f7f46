"""`shard.write_behind`: the writer on its own thread gets every batch in order, and an error on
either side reaches the caller as it would in line (the writer closes its files either way)."""

from __future__ import annotations

import threading

import pytest

from layerbeam.transforms.shard import write_behind


def _writer(log: list, fail_at: int | None = None):
    def write(batches):
        log.append(("thread", threading.current_thread().name))
        got = []
        try:
            for b in batches:
                if b == fail_at:
                    raise OSError(f"disk full at {b}")
                got.append(b)
        finally:
            log.append(("closed", list(got)))  # what a writer's finally does: close its files
        return got

    return write


def test_every_batch_reaches_the_writer_in_order_on_another_thread():
    log = []
    assert write_behind(_writer(log), iter(range(100))) == list(range(100))
    assert log[0] == ("thread", "layerbeam-writer")
    assert log[-1] == ("closed", list(range(100)))


def test_an_error_while_producing_reaches_the_writer_and_the_caller():
    log = []
    closed = []

    def batches():
        try:
            yield 1
            yield 2
            raise ValueError("model failed on batch 3")
        finally:
            closed.append(True)

    with pytest.raises(ValueError, match="batch 3"):
        write_behind(_writer(log), batches())
    assert log[-1] == ("closed", [1, 2])  # the writer closed what it had, as in line
    assert closed == [True]


def test_an_error_while_writing_stops_the_producer_and_reaches_the_caller():
    log, produced, closed = [], [], []

    def batches():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.append(True)

    with pytest.raises(OSError, match="disk full at 5"):
        write_behind(_writer(log, fail_at=5), batches(), depth=2)
    assert log[-1] == ("closed", [0, 1, 2, 3, 4])
    assert len(produced) < 20  # the producer stopped soon after (the queue holds 2)
    assert closed == [True]  # and its generator was ended, not left to the garbage collector
