"""How the chunks of one appended dataset are stored: :class:`ChunkStore`, owned by its
:class:`~writer.hdf5.dataset_writer.DatasetAppender` (which owns the points and knows none
of this).

The rules of storing a chunk are all here and in this store's part for the row being filled,
:class:`~writer.hdf5.last_row.LastRow`:

* a full chunk row, bslz4 setting: compressed with :func:`blissdata.bslz4.compress` and stored
  with ``write_direct_chunk``, in a ``ThreadPoolExecutor`` (bitshuffle releases the GIL),
  stored in order as the compressions finish, at most ``2 * workers + 2`` chunks in flight;
  or on the caller's thread (``workers=0``); gzip the same (as HDF5's shuffle + deflate
  filters would store it); other settings: HDF5 writes it, filters on this thread;
* frames already in the bslz4 chunk format: stored untouched, in order with the other chunks;
* the row being filled, at a flush: padded so that its rewrites happen in place
  (:mod:`writer.hdf5.partial_chunks`), raw in SWMR mode (the SWMR rules:
  :meth:`LastRow.store_version`), by HDF5 for filters that don't tolerate padding, or at its
  exact size when final; when it fills, stored over those versions (and the file flushed);
* the dataset's length, set before the chunks are written, and what a failed write leaves
  (:meth:`ChunkStore.guard`).

Every HDF5 call happens on the caller's thread; a ChunkStore is used from one thread at a time.
"""

from __future__ import annotations

import functools
import os
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import h5py
import numpy as np

from blissdata import bslz4

from .last_row import LastRow, split_chunks, write_rows

__all__ = ["ChunkStore", "deflate_level"]


_worker = threading.local()


def _compress_in_worker(part: np.ndarray) -> bytes:
    """bslz4.compress with one OpenMP thread in this worker: the pool is the parallelism
    (bitshuffle's wheel would otherwise run an OpenMP team per worker and oversubscribe the
    cores; see blissdata.bslz4)."""
    if not getattr(_worker, "single", False):
        bslz4.set_openmp_threads(1)
        _worker.single = True
    return bslz4.compress(part)


def deflate_level(dset: h5py.Dataset) -> int | None:
    """The gzip level if the dataset's filters are exactly shuffle then deflate (what the
    "gzip" setting makes), else None: such chunks can be compressed here, in parallel."""
    plist = dset.id.get_create_plist()
    filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
    if len(filters) == 2 and filters[0][0] == h5py.h5z.FILTER_SHUFFLE \
            and filters[1][0] == h5py.h5z.FILTER_DEFLATE:
        return int(filters[1][2][0]) if filters[1][2] else 6
    return None


def _deflate_chunk(part: np.ndarray, level: int) -> bytes:
    """One chunk as HDF5's shuffle + deflate filters store it (zlib releases the GIL)."""
    raw = np.ascontiguousarray(part).view(np.uint8)
    size = part.dtype.itemsize
    if size > 1:  # shuffle: byte j of every element together, j = 0..size-1
        raw = raw.reshape(-1, size).T
    return zlib.compress(raw.tobytes(), level)


class ChunkStore:
    """Stores the chunks of one chunked dataset of shape ``(npoints, *point_shape)``, given
    as rows of points by its appender: full rows (:meth:`write_row`, :meth:`write_frames`,
    :meth:`put_frame`, :meth:`drain`), the row being filled (:meth:`store_partial`,
    :meth:`replace_partial`), the dataset's length and point extent.

    ``bslz4_setting``: the dataset is Bitshuffle+LZ4. ``executor``: a ThreadPoolExecutor to
    compress chunks in (not shut down by :meth:`close`); if None, a pool of ``workers``
    threads is created when first needed; ``workers=0`` compresses on the caller's thread.
    Default ``workers``: 0 if bitshuffle has OpenMP, else ``min(4, cpus)``.

    ``length``: the dataset's length (points written); ``failed_at``: after a failed write,
    the length before it (None until then); ``compresses``: full rows are compressed here.
    """

    def __init__(self, dset: h5py.Dataset, bslz4_setting: bool, fill_value, executor=None,
                 workers=None):
        self._dset = dset
        self._dtype = dset.dtype
        self._chunks = tuple(dset.chunks)
        self._n = self._chunks[0]
        self._bslz4 = bslz4_setting
        # gzip chunks are compressed in the pool too (else HDF5 does it on this thread)
        self._deflate = None if bslz4_setting else deflate_level(dset)
        self.compresses = self._bslz4 or self._deflate is not None
        self._fill_value = fill_value
        self._cur = tuple(dset.shape[1:])  # current point extent (max so far in -1 dims)
        self._executor = executor
        self._own_executor = None
        if workers is None:  # see blissdata.bslz4: the wheel's OpenMP ties with a pool
            workers = 0 if bslz4.openmp_available() else min(4, os.cpu_count() or 1)
        self._workers = int(workers)
        self._queue: deque = deque()  # (end point, [(offset, Future | bytes)], nbytes)
        self._queued_bytes = 0
        self._max_inflight = 2 * max(self._workers, 1) + 2
        self.length = dset.shape[0]  # == dataset.shape[0], kept here: h5py's costs ~10 us
        # a write failed (disk full...): the points stored before it, all that counts now
        self.failed_at: int | None = None
        self._flush_due = False  # see end_replace()
        # the row being filled as the file holds it (resuming: reads what to protect)
        self._last = LastRow(dset, bslz4_setting, fill_value, self.set_length)

    @property
    def pending_bytes(self) -> int:
        """Bytes held in memory: the chunks queued for compression/writing and the compressed
        bytes of the row being filled as the file holds them (kept to rewrite them safely)."""
        return self._queued_bytes + self._last.held_bytes

    @property
    def idle(self) -> bool:
        """No chunk queued (in flight)."""
        return not self._queue

    def pool(self):
        """The executor chunks are compressed in; None if they are compressed on the
        caller's thread (``workers=0`` and no executor)."""
        if self._executor is None and self._workers <= 0:
            return None
        if self._executor is not None:
            return self._executor
        if self._own_executor is None:
            self._own_executor = ThreadPoolExecutor(max(self._workers, 1),
                                                    thread_name_prefix="bslz4")
        return self._own_executor

    def set_extent(self, extent: tuple) -> None:
        """The point extent grows (varying dimensions): the dataset is resized."""
        self._dset.resize((self.length, *extent))
        self._cur = extent
        self._last.set_extent(extent)

    def set_length(self, length: int) -> None:
        """Make the dataset at least ``length`` points long."""
        if self.length < length:  # HDF5's own call: h5py's resize() costs twice as much
            self._dset.id.set_extent((length, *self._cur))
            self.length = length

    @contextmanager
    def guard(self):
        """Writes that may fail: the length is set before the chunks are written (HDF5 writes
        inside the extent only), so a failure leaves it ahead of what is stored; from then
        on, flush() reports only the points stored before (:attr:`failed_at`)."""
        before = self.length
        try:
            yield
        except BaseException:
            self.failed_at = before if self.failed_at is None else min(self.failed_at, before)
            raise

    # ------------------------------------------------------------------ full rows
    def write_row(self, start: int, block: np.ndarray) -> None:
        """A complete chunk row of points starting at ``start``: write (or queue)."""
        n = self._n
        if not self._bslz4 and self._deflate is None:
            with self.guard():
                self.set_length(start + n)
                write_rows(self._dset, start, block)
            return
        pieces = []
        nbytes = block.nbytes
        pool = self.pool()
        if self._bslz4:
            compress = _compress_in_worker if pool is not None else bslz4.compress
        else:
            compress = functools.partial(_deflate_chunk, level=self._deflate)
        for offset, part in split_chunks(block, self._chunks, self._fill_value, self._dtype):
            if pool is not None:
                pieces.append(((start, *offset), pool.submit(compress, part)))
            else:
                pieces.append(((start, *offset), compress(part)))
        self._queue.append((start + n, pieces, nbytes))
        self._queued_bytes += nbytes
        self.drain(self._max_inflight // 2 if len(self._queue) > self._max_inflight else None)

    def write_frames(self, start: int, chunks: list) -> None:
        """Frames already in the stored format, one chunk each, at ``start``: written now
        (nothing may be in flight: :attr:`idle`), after one resize."""
        zeros = (0,) * (len(self._chunks) - 1)
        with self.guard():
            self.set_length(start + len(chunks))
            write = self._dset.id.write_direct_chunk
            for k, c in enumerate(chunks):
                write((start + k, *zeros), c)

    def put_frame(self, start: int, data: bytes) -> None:
        """A frame already in the stored format (one chunk) at ``start``: queued in order
        after the chunks in flight (then :meth:`drain_some`)."""
        zeros = (0,) * (len(self._chunks) - 1)
        self._queue.append((start + 1, [((start, *zeros), data)], len(data)))
        self._queued_bytes += len(data)

    def drain_some(self) -> None:
        """Write what is done; wait for the oldest chunks while too many are in flight."""
        self.drain(self._max_inflight // 2 if len(self._queue) > self._max_inflight else None)

    def drain(self, keep=None) -> None:
        """Write the queued chunks in order: every one whose compression is done, and, while
        more than ``keep`` chunk rows are queued, wait for the oldest (keep=None: no wait).
        The dataset is resized once per call, then the chunks are written."""
        q = self._queue
        ready = []
        while q:
            end, pieces, nbytes = q[0]
            if (keep is None or len(q) <= keep) and not all(
                    not isinstance(p, Future) or p.done() for _, p in pieces):
                break
            ready.append((end, [(offset, p.result() if isinstance(p, Future) else p)
                                for offset, p in pieces], nbytes))
            q.popleft()
        if not ready:
            return
        with self.guard():
            self.set_length(ready[-1][0])
            write = self._dset.id.write_direct_chunk
            for _end, pieces, nbytes in ready:
                for offset, data in pieces:
                    write(offset, data)
                self._queued_bytes -= nbytes

    # ------------------------------------------------------------------ the row being filled
    def store_partial(self, start: int, tail: np.ndarray, flushed: int, k: int, full_row,
                      final: bool) -> None:
        """Store the row being filled at ``start`` (the queue drained first): its first ``k``
        points are ``tail[:k]``, the first ``flushed`` of them already in the file;
        ``full_row()`` gives the row at its full size (points, then fill value). Stored
        padded, so that its rewrites happen in place (:mod:`writer.hdf5.partial_chunks`),
        raw in SWMR mode, or by HDF5 (filters that don't tolerate padding); ``final=True``
        (no more points will come) stores it at its exact size. The dataset is then
        ``start + k`` points long."""
        last = self._last
        end = start + k
        if last.swmr_filtered():
            if flushed < k:
                last.store_version(start, full_row(), complete=False, length=end)
            else:
                self.set_length(end)
        elif (last.holds_padded() and final) or (last.pads and not final and flushed < k):
            last.store(start, full_row(), padding=not final, length=end)
        elif flushed < k:  # HDF5's own path
            self.set_length(end)
            write_rows(self._dset, start + flushed, tail[flushed:k])
        else:
            self.set_length(end)

    def replace_partial(self, start: int, block: np.ndarray) -> bool:
        """The row at ``start`` is complete: if the file holds versions of it (flushed
        partially), store it over them, safely, and return True (then call
        :meth:`end_replace`); else do nothing and return False (then :meth:`write_row`)."""
        n = self._n
        last = self._last
        if last.swmr_versions():  # stored partially (SWMR)
            self.drain(keep=0)
            with self.guard():
                last.store_version(start, block, complete=True, length=start + n)
        elif last.holds_padded():  # flushed partially: replace the padded chunks safely
            self.drain(keep=0)
            with self.guard():
                last.store(start, block, padding=False, length=start + n)
            self._flush_due = True
        else:
            return False
        return True

    def end_replace(self) -> None:
        """After :meth:`replace_partial`, once the caller counted the row: the padded
        chunks replaced, the file is flushed."""
        if self._flush_due:
            self._flush_due = False
            # its old index entry must not outlive this write for long
            self._dset.file.flush()

    def close(self) -> None:
        """Stop the thread pool if this store made it, and close the chunk compressor."""
        if self._own_executor is not None:
            self._own_executor.shutdown(wait=True)
            self._own_executor = None
        self._last.close()
