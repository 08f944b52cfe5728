"""Run a producer one or more steps ahead of its consumer, in a background thread.

Slide streaming reads, resizes and stain-normalises tiles (OpenCV, NumPy, tifffile: all
release the GIL) while the model runs on the previous batch, so preprocessing hides
behind the forward pass. A bounded queue keeps memory flat: at most ``depth`` batches
wait. Exceptions in the producer reach the consumer at the point they occurred.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

T = TypeVar("T")
_DONE = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order while a thread produces up to ``depth`` of them ahead.

    Stopping early (``break``, an exception in the consumer) stops the producer at its
    next item; nothing is left running.
    """
    if depth < 1:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(_Raised(e))
            return
        put(_DONE)

    t = threading.Thread(target=work, name="stimage-prefetch", daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join(timeout=5)
