"""Read ahead: run an iterator in a background thread, a bounded number of items ahead.

A DataLoader worker alternates between waiting for shard bytes and decoding them. With the
reading moved to a thread, the transfer of the next shard (a GET to an object store, an HTTP
response) overlaps the decoding of the current one; the thread waits on the network with the GIL
released. The items, their order and the exceptions raised are exactly those of the iterator
run in place: only the timing changes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL = 0.5  # seconds between checks for a stop request while the queue is full
_JOIN_TIMEOUT = 5.0  # seconds a stopped reader may take to finish its current read


class _Raised:
    """Carries an exception raised by the iterator to the consuming thread."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def read_ahead(produce: Callable[[], Iterable[T]], depth: int) -> Iterator[T]:
    """The items of ``produce()``, which runs in a daemon thread at most ``depth`` items ahead.

    ``depth <= 0`` iterates in place (no thread). Closing the returned generator (or dropping
    it) stops the thread and closes the iterator there, so open streams are released.
    """
    if depth <= 0:
        yield from produce()
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Queue ``item``; False once the consumer has stopped (then produce nothing more)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL)
                return not stop.is_set()
            except queue.Full:
                continue
        return False

    def run() -> None:
        iterator = iter(produce())
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed over to the consumer, who re-raises it
            put(_Raised(exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):  # wake a reader blocked on the full queue
            while True:
                items.get_nowait()
        # a read stalled in the network is left to its time-out; the daemon thread then ends
        thread.join(_JOIN_TIMEOUT)
