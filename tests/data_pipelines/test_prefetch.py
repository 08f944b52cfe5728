"""prefetch: same items in order, bounded look-ahead, errors surface, early stop stops the thread."""

import threading
import time

import pytest

from data_pipelines.prefetch import prefetch


def test_same_items_in_order():
    assert list(prefetch(range(100), depth=3)) == list(range(100))
    assert list(prefetch(iter([]), depth=2)) == []
    assert list(prefetch(range(5), depth=0)) == list(range(5))


def test_look_ahead_is_bounded():
    made = []

    def gen():
        for i in range(50):
            made.append(i)
            yield i

    it = prefetch(gen(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)  # let the producer run as far as the queue allows
    # one consumed, two queued, one blocked in put: never the whole stream
    assert len(made) <= 4
    it.close()


def test_producer_error_reaches_consumer_in_place():
    def gen():
        yield 1
        yield 2
        raise ValueError("bad tile")

    got = []
    with pytest.raises(ValueError, match="bad tile"):
        for x in prefetch(gen()):
            got.append(x)
    assert got == [1, 2]


def test_early_stop_ends_the_thread():
    before = threading.active_count()
    for x in prefetch(iter(range(10_000)), depth=2):
        if x == 3:
            break
    time.sleep(0.3)
    assert threading.active_count() == before
