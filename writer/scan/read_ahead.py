"""Reading a scan's streams one batch ahead of the thread that writes them.

Receiving a batch from Redis is mostly waiting on the socket (no GIL held); compressing and
writing the previous batch is mostly bitshuffle and HDF5. Doing the two in separate threads
lets them overlap: ~20-30% more frames per second on 2 cores (bench/bench_writer.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

_END = object()  # every stream of the cursor is sealed and read


class ReadAhead:
    """`cursor.read()` in a thread of its own; `get()` hands its results over in order.

    At most two batches wait (one queued, one being read), so memory stays bounded by what
    `count()` allows per read. An exception raised by the read comes out of `get()`.
    """

    def __init__(self, cursor, count: Callable[[], int], name: str, poll_s: float = 0.1,
                 gather: Callable[[dict], float] | None = None):
        """`gather(views)`: seconds to wait before the next read after one that brought
        `views` (None: read again at once). Each read costs about the same per stream
        however few points it brings: when points trickle in, waiting a little gathers
        more of them per read."""
        self._cursor = cursor
        self._count = count
        self._poll_s = poll_s
        self._gather = gather
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self.ended = False  # set by get() once every stream is sealed and handed over
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if len(self._cursor.ended) == len(self._cursor.streams):
                    self._put(_END)
                    return
                views = self._cursor.read(block=True, timeout=self._poll_s,
                                          count=self._count())
                if views:
                    self._put(views)
                    pause = self._gather(views) if self._gather is not None else 0.0
                    if pause > 0:
                        self._stop.wait(pause)
        except Exception as exc:  # handed to the writing thread, which decides
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._poll_s)
                return
            except queue.Full:
                continue

    def get(self, timeout: float) -> dict:
        """The next batch {stream name: StreamView}; {} if none came within `timeout` s or
        after the end (see `ended`)."""
        if self.ended:
            return {}
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return {}
        if item is _END:
            self.ended = True
            return {}
        if isinstance(item, Exception):
            self.ended = True
            raise item
        return item

    def close(self) -> None:
        """Stop reading (what was read and not taken is dropped: it is still in Redis)."""
        self._stop.set()
        self._thread.join(timeout=5 * self._poll_s + 1)
