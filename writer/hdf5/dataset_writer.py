"""Appending streamed points into one chunked, compressed HDF5 dataset: :class:`DatasetAppender`.

A dataset has shape ``(npoints, *point_shape)``; its chunk shape is decided in one place,
:func:`writer.hdf5.chunking.chunk_shape` (from dtype and point shape alone), and the compression
by :mod:`writer.hdf5.compression`.

How points travel (all HDF5 calls happen on the caller's thread):

* Points are gathered in memory per chunk (the *tail*: the points of the chunk being
  filled). When a chunk is complete it is written as a whole:

  - bslz4 setting: the chunk is compressed with :func:`blissdata.bslz4.compress` and
    stored with ``write_direct_chunk``. Where: in a ``ThreadPoolExecutor`` (bitshuffle
    releases the GIL: ~1.8x on 2 cores with one OpenMP thread per worker), stored in order as
    the compressions finish, at most ``2 * workers + 2`` chunks in flight; or on the caller's
    thread when bitshuffle has OpenMP (the PyPI wheel: one call then uses all cores, which
    measured as fast as the pool; see :mod:`blissdata.bslz4`) and no executor/workers given.
  - other settings: ``dataset[a:b] = chunk`` (HDF5 runs the filter on this thread).

* ``flush()`` waits for the chunks in flight, then writes the partial tail; the tail stays in
  memory and its chunk is rewritten whole when it fills. A partial chunk is stored padded,
  so that HDF5 rewrites it in place: points already in the file are never put at risk by
  the next rewrite (see :mod:`writer.hdf5.partial_chunks`). When a chunk stored that way fills
  up, the file is flushed at once after its final write.
* ``flush()`` flushes no metadata itself (``H5Dflush`` would write the chunk index without
  the superblock's end of file); the caller flushes the file.
* The dataset's length (``dataset.shape[0]``) only covers points actually written, so a
  reader of the file never sees fill values in place of points still in memory.
* ``append_compressed`` stores frames already in the bslz4 chunk format untouched (in order
  with the other chunks) when the dataset is bslz4 with one frame per chunk; otherwise they
  are decompressed and appended.

Varying dimensions (``-1`` in the point shape): the dataset is resizable there and its extent
is the largest extent seen so far; smaller points are padded with the fill value, and when a
point is bigger the dataset grows (earlier points read as fill value in the new region).
Fill value, unless given: NaN for float and complex dtypes, 0 for integers and booleans.

A DatasetAppender is used from one thread at a time.
"""

from __future__ import annotations

import functools
import itertools
from contextlib import contextmanager
import os
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import h5py
import numpy as np

from blissdata import bslz4

from .chunking import chunk_shape
from .compression import dataset_is_bslz4, parse_compression
from .partial_chunks import ChunkCompressor, capacity_for, padded, padding_tolerated

__all__ = ["DatasetAppender", "default_fill_value", "last_chunks"]

#: memory first given to the points of a chunk being filled (then doubled as needed)
TAIL_FIRST_BYTES = 16 * 1024


def default_fill_value(dtype):
    """NaN for float/complex dtypes, 0 for the others."""
    dt = np.dtype(dtype)
    return np.nan if dt.kind in "fc" else 0


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


def last_chunks(dset: h5py.Dataset) -> dict[tuple, tuple[int, bytes]]:
    """The chunks of the last chunk row as stored: {offset in the point axes: (filter mask,
    bytes)}. Raises ValueError if one of a Bitshuffle+LZ4 dataset is torn (what a write cut
    short leaves): HDF5's decoder would crash the process on it, so this runs before
    anything reads that row (resuming, or shrinking the dataset)."""
    n, points = dset.chunks[0], dset.shape[0]
    if not points:
        return {}
    start = (points - 1) // n * n
    check = dataset_is_bslz4(dset)
    grids = [range(0, s, c) for s, c in zip(dset.shape[1:], dset.chunks[1:])]
    found = {}
    for offset in itertools.product(*grids):
        try:
            mask, data = dset.id.read_direct_chunk((start, *offset))
        except (KeyError, OSError, RuntimeError):  # never written: reads as fill value
            continue
        if check and not mask:
            try:
                bslz4.check_chunk(data, dset.dtype, dset.chunks, padded=True)
            except ValueError as exc:
                raise ValueError(f"dataset {dset.name!r} in {dset.file.filename}: its last "
                                 f"chunk is damaged ({exc}); cannot resume appending to "
                                 "it") from None
        found[offset] = (mask, data)
    return found


def _immutable(arr: np.ndarray) -> bool:
    """True if the array's memory belongs to an immutable ``bytes`` object (e.g. decoded
    with np.frombuffer from a Redis reply): then no one can change it under us."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, bytes)


class DatasetAppender:
    """Append points to a chunked dataset of shape ``(npoints, *point_shape)``.

    ``DatasetAppender(group, name, dtype, point_shape=(), compression=None, fill_value=None,
    attrs=None, executor=None, workers=None)`` creates the dataset ``group[name]``;
    ``DatasetAppender.open(dataset)`` resumes on an existing one (its length = the points
    already stored).

    ``compression``: a setting for :func:`writer.hdf5.compression.parse_compression` (default
    bitshuffle-lz4). ``executor``: a ThreadPoolExecutor to compress bslz4 chunks in (not shut
    down by :meth:`close`; its threads are set to run bitshuffle with one OpenMP thread); if
    None, a pool of ``workers`` threads is created when first needed; ``workers=0``
    compresses on the caller's thread. Default ``workers``: 0 if bitshuffle has OpenMP
    (:func:`blissdata.bslz4.openmp_available`), else ``min(4, cpus)``.
    """

    def __init__(self, group: h5py.Group, name: str, dtype, point_shape=(), compression=None,
                 fill_value=None, attrs=None, *, executor=None, workers=None, npoints=None,
                 count_time=None):
        dtype = np.dtype(dtype)
        if dtype.kind not in "biufc":
            raise ValueError(f"dataset {name!r} in {group.file.filename}: dtype {dtype} is not "
                             "numeric")
        point_shape = tuple(int(d) for d in point_shape)
        setting = parse_compression(compression)
        if fill_value is None:
            fill_value = default_fill_value(dtype)
        # the chunk shape is decided here, by writer.hdf5.chunking.chunk_shape (dtype, point shape,
        # and the scan header's npoints and count_time)
        chunks = chunk_shape(dtype, point_shape, npoints, count_time)
        shape = (0, *(0 if d == -1 else d for d in point_shape))
        maxshape = (None, *(None if d == -1 else d for d in point_shape))
        dset = group.create_dataset(name, shape=shape, maxshape=maxshape, dtype=dtype,
                                    chunks=chunks, fillvalue=fill_value,
                                    **setting.h5py_kwargs())
        if attrs:
            dset.attrs.update(attrs)
        self._setup(dset, point_shape, setting.is_bslz4, executor, workers)

    @classmethod
    def open(cls, dataset: h5py.Dataset, *, executor=None, workers=None) -> "DatasetAppender":
        """Resume appending to an existing dataset (e.g. one made by a previous appender).
        Dimensions of the point that are resizable (maxshape None) count as varying."""
        if dataset.chunks is None or dataset.ndim < 1 or dataset.maxshape[0] is not None:
            raise ValueError(f"dataset {dataset.name!r} in {dataset.file.filename}: cannot "
                             "append to it: it must be chunked and resizable along axis 0 "
                             f"(chunks={dataset.chunks}, maxshape={dataset.maxshape})")
        point_shape = tuple(-1 if m is None else d
                            for d, m in zip(dataset.shape[1:], dataset.maxshape[1:]))
        self = cls.__new__(cls)
        self._setup(dataset, point_shape, dataset_is_bslz4(dataset), executor, workers)
        return self

    def _setup(self, dset, point_shape, bslz4_setting, executor, workers):
        self._dset = dset
        self.dtype = dset.dtype
        self.point_shape = point_shape
        self._varying = tuple(i for i, d in enumerate(point_shape) if d == -1)
        self._chunks = tuple(dset.chunks)
        self._n = self._chunks[0]
        self._bslz4 = bslz4_setting
        # gzip chunks are compressed in the pool too (else HDF5 does it on this thread)
        self._deflate = None if bslz4_setting else deflate_level(dset)
        fill = dset.fillvalue
        self.fill_value = fill if fill is not None else default_fill_value(self.dtype)
        self._cur = tuple(dset.shape[1:])  # current point extent (max so far in -1 dims)
        self._executor = executor
        self._own_executor = None
        if workers is None:  # see blissdata.bslz4: the wheel's OpenMP ties with a pool
            workers = 0 if bslz4.openmp_available() else min(4, os.cpu_count() or 1)
        self._workers = int(workers)
        self._queue: deque = deque()  # (end point, [(offset, Future | bytes)], nbytes)
        self._queued_bytes = 0
        self._max_inflight = 2 * max(self._workers, 1) + 2
        plist = dset.id.get_create_plist()
        self._pad = padding_tolerated(plist)  # see flush()
        self._raw_mask = (1 << plist.get_nfilters()) - 1  # every filter skipped: stored raw
        self._raw_nbytes = self.dtype.itemsize * int(np.prod(self._chunks, dtype=np.int64))
        self._compressor = None  # made when first needed (filters other than bslz4)
        # one frame per chunk, whole frame: precompressed frames can go in untouched
        self._direct_frames = (self._bslz4 and not self._varying
                               and self._chunks == (1, *point_shape))
        stored = dset.shape[0]
        self._length = stored  # == dataset.shape[0], kept here: h5py's shape costs ~10 us
        # a write failed (disk full...): the points stored before it, all that counts now
        self._failed_at: int | None = None
        self._tail_start = stored - stored % self._n
        self._point_nbytes = self.dtype.itemsize * int(np.prod(self._cur, dtype=np.int64))
        self._k = stored - self._tail_start
        self._tail = self._new_tail(self._k)
        self._tail_flushed = self._k  # tail points already in the file
        # the tail's chunks as the file holds them, padded:
        # offset in the point axes -> (filter mask, compressed bytes, stored size)
        self._held: dict[tuple, tuple[int, bytes, int]] = {}
        # the same in SWMR mode, where a stored version is never overwritten unless it is
        # raw: offset -> (filter mask, stored size, bytes of older versions left behind)
        self._versions: dict[tuple, tuple[int, int, int]] = {}
        if self._k:  # resuming on a partial chunk: what the file holds is what to protect
            for offset, (mask, data) in last_chunks(dset).items():
                self._versions[offset] = (mask, len(data), 0)
                if self._pad:
                    self._held[offset] = (mask, data, len(data))
            self._tail[:self._k] = dset[self._tail_start:stored]

    # ------------------------------------------------------------------ properties
    @property
    def dataset(self) -> h5py.Dataset:
        return self._dset

    @property
    def name(self) -> str:
        return self._dset.name

    @property
    def chunks(self) -> tuple:
        return self._chunks

    @property
    def npoints(self) -> int:
        """Points appended so far (stored or not)."""
        return self._tail_start + self._k

    def __len__(self) -> int:
        return self.npoints

    @property
    def stored(self) -> int:
        """Points written into the HDF5 dataset (its length)."""
        return self._length

    @property
    def pending_bytes(self) -> int:
        """Bytes of point data this appender holds in memory: the chunks queued for
        compression/writing, the tail (the points of the chunk being filled, including
        those already flushed, kept to write the chunk whole once it fills) and the tail's
        compressed bytes as the file holds them (kept to rewrite them safely)."""
        return (self._queued_bytes + self._k * self._point_nbytes
                + sum(len(data) for _, data, _ in self._held.values()))

    @property
    def is_bslz4(self) -> bool:
        return self._bslz4

    # ------------------------------------------------------------------ appending
    def _where(self) -> str:
        return f"dataset {self._dset.name!r} in {self._dset.file.filename}"

    def _check(self, points, what="points") -> tuple[np.ndarray, bool]:
        """Return (points as an array of our dtype, whether we own its memory)."""
        arr = points if isinstance(points, np.ndarray) else np.asarray(points)
        def expected():  # formatting a dtype costs: on error only
            return f"dtype {self.dtype} (or one that casts safely) and shape " \
                   f"(n, *{self.point_shape})"
        if arr.ndim != len(self.point_shape) + 1:
            raise ValueError(f"{self._where()}: {what} of dtype {arr.dtype} shape {arr.shape} "
                             f"given, expected {expected()}")
        for d, e in zip(arr.shape[1:], self.point_shape):
            if e != -1 and d != e:
                raise ValueError(f"{self._where()}: {what} of shape {arr.shape} given, "
                                 f"expected {expected()}")
        owned = False
        if arr.dtype != self.dtype:
            if not np.can_cast(arr.dtype, self.dtype, "safe"):
                raise ValueError(f"{self._where()}: {what} of dtype {arr.dtype} given, "
                                 f"expected {expected()}")
            arr = arr.astype(self.dtype)
            owned = True
        return arr, owned

    def append(self, points) -> None:
        """Append points (first axis = points; shape ``(n, *point_shape)``). For -1 dims
        the points may be smaller (padded) or bigger (the dataset grows)."""
        arr, owned = self._check(points)
        if self._varying and arr.shape[1:] != self._cur:
            arr = self._fit(arr, [arr.shape[1:]])
            owned = True
        self._append(arr, owned)

    def append_varying(self, points) -> None:
        """Append a list of points of varying shape (dims -1 of the point shape may differ
        between points); each is padded with the fill value to the dataset's current extent,
        which grows to the largest point seen."""
        arrays = []
        for i, p in enumerate(points):
            a = np.asarray(p)
            arr, _ = self._check(a[np.newaxis], what=f"point {i}")
            arrays.append(arr[0])
        if not arrays:
            return
        shapes = [a.shape for a in arrays]
        self._grow(shapes)
        batch = np.full((len(arrays), *self._cur), self.fill_value, dtype=self.dtype)
        for i, a in enumerate(arrays):
            batch[(i, *(slice(0, s) for s in a.shape))] = a
        self._append(batch, True)

    def append_compressed(self, chunks, validate: bool = False) -> None:
        """Append frames given as bslz4 chunks (one chunk = one point, the format of
        :mod:`blissdata.bslz4`). Stored untouched with ``write_direct_chunk`` when the
        dataset is bslz4 with one whole frame per chunk; else decompressed and appended.
        A chunk whose header doesn't match the point's size raises ValueError (nothing of
        that call is appended); ``validate=True`` also walks each chunk's block structure
        (:func:`blissdata.bslz4.check_chunk`) before storing it untouched."""
        if self._varying:
            raise ValueError(f"{self._where()}: compressed frames need a fixed point shape, "
                             f"this dataset's is {self.point_shape}")
        chunks = list(chunks)
        if not chunks:
            return
        if not self._direct_frames:
            if self._executor is not None or self._workers > 0:
                arrays = list(self._pool().map(self._decompress_one, chunks))
            else:
                arrays = [self._decompress_one(c) for c in chunks]
            self._append(np.stack(arrays), True)
            return
        nbytes = self._point_nbytes
        for i, c in enumerate(chunks):
            try:
                found = bslz4.uncompressed_nbytes(c)
            except ValueError as exc:
                raise ValueError(f"{self._where()}: compressed frame {i}: {exc}") from None
            if found != nbytes:
                raise ValueError(f"{self._where()}: compressed frame {i} holds {found} bytes, "
                                 f"expected {nbytes} (dtype {self.dtype} shape "
                                 f"{self.point_shape})")
            if validate:
                try:
                    bslz4.check_chunk(c, self.dtype, self.point_shape)
                except ValueError as exc:
                    raise ValueError(f"{self._where()}: compressed frame {i}: {exc}") from None
        zeros = (0,) * len(self.point_shape)
        if not self._queue:  # nothing in flight: one resize, then the chunks as they are
            start = self._tail_start
            with self._guard():
                self._set_length(start + len(chunks))
                write = self._dset.id.write_direct_chunk
                for k, c in enumerate(chunks):
                    write((start + k, *zeros), c)
            self._tail_start += len(chunks)
            return
        for c in chunks:
            start = self._tail_start
            data = bytes(c) if not isinstance(c, bytes) else c
            self._queue.append((start + 1, [((start, *zeros), data)], len(data)))
            self._queued_bytes += len(data)
            self._tail_start += 1
            self._drain(self._max_inflight // 2 if len(self._queue) > self._max_inflight
                        else None)

    def _decompress_one(self, chunk):
        try:
            return bslz4.decompress(chunk, self.dtype, self.point_shape)
        except ValueError as exc:
            raise ValueError(f"{self._where()}: compressed frame: {exc}") from None

    # ------------------------------------------------------------------ internals
    def _new_tail(self, rows: int = 0) -> np.ndarray:
        """Room for the points of the chunk being filled: it grows with them (doubling, see
        :meth:`_reserve_tail`) up to a chunk, so a slowly filling chunk of one of many
        channels holds what came, not a chunk's worth of memory."""
        first = max(1, TAIL_FIRST_BYTES // max(1, self._point_nbytes))
        rows = min(self._n, max(rows, first))
        if self._varying:
            return np.full((rows, *self._cur), self.fill_value, dtype=self.dtype)
        return np.empty((rows, *self._cur), dtype=self.dtype)

    def _reserve_tail(self, rows: int) -> None:
        """Make the tail hold at least ``rows`` points (its points kept)."""
        if rows <= len(self._tail):
            return
        tail = self._new_tail(max(rows, 2 * len(self._tail)))
        tail[:self._k] = self._tail[:self._k]
        self._tail = tail

    def _full_tail(self) -> np.ndarray:
        """The chunk row being filled at its full size: the points, then the fill value (a
        new array while the tail is smaller than a chunk)."""
        if len(self._tail) < self._n:
            block = np.full((self._n, *self._cur), self.fill_value, dtype=self.dtype)
            block[:self._k] = self._tail[:self._k]
            return block
        self._tail[self._k:] = self.fill_value  # rows past the points: fill, not garbage
        return self._tail

    def _grow(self, shapes) -> None:
        """Grow the -1 dims of the current extent to hold points of ``shapes``."""
        new = list(self._cur)
        for ax in self._varying:
            new[ax] = max(new[ax], max(s[ax] for s in shapes))
        new = tuple(new)
        if new == self._cur:
            return
        self._dset.resize((self._length, *new))
        tail = np.full((len(self._tail), *new), self.fill_value, dtype=self.dtype)
        tail[(slice(None), *(slice(0, s) for s in self._cur))] = self._tail
        self._tail = tail
        self._cur = new
        self._point_nbytes = self.dtype.itemsize * int(np.prod(new, dtype=np.int64))

    def _fit(self, arr, shapes) -> np.ndarray:
        """Pad a batch of points to the current extent (growing it first if needed)."""
        self._grow(shapes)
        if arr.shape[1:] == self._cur:
            return arr
        out = np.full((arr.shape[0], *self._cur), self.fill_value, dtype=self.dtype)
        out[(slice(None), *(slice(0, s) for s in arr.shape[1:]))] = arr
        return out

    def _append(self, arr: np.ndarray, owned: bool) -> None:
        m = arr.shape[0]
        n = self._n
        i = 0
        # chunks compressed in the pool may reference the caller's array only if nobody
        # can change it (ours, or bytes-backed); else append() waits for their compression
        # before returning (no copy: the pool still compresses the batch's chunks in parallel)
        wait = (self._bslz4 or self._deflate is not None) and not (owned or _immutable(arr))
        while i < m:
            if self._k == 0 and m - i >= n:
                # whole chunks straight from the caller's array
                j = i + (m - i) // n * n
                for s in range(i, j, n):
                    self._write_block(arr[s:s + n])
                i = j
                if wait:
                    self._drain(keep=0)
                continue
            take = min(n - self._k, m - i)
            self._reserve_tail(self._k + take)
            self._tail[self._k:self._k + take] = arr[i:i + take]
            self._k += take
            i += take
            if self._k == n:
                tail = self._tail
                self._tail = self._new_tail()
                self._k = 0
                self._tail_flushed = 0
                if self._versions and self._swmr_filtered():  # stored partially (SWMR)
                    self._drain(keep=0)
                    with self._guard():
                        self._store_version(tail, complete=True, length=self._tail_start + n)
                    self._tail_start += n
                elif self._held:  # flushed partially: replace the padded chunks safely
                    self._drain(keep=0)
                    with self._guard():
                        self._store(tail, padding=False, length=self._tail_start + n)
                    self._tail_start += n
                    # its old index entry must not outlive this write for long
                    self._dset.file.flush()
                else:
                    self._write_block(tail)

    def _write_block(self, block: np.ndarray) -> None:
        """A complete chunk row of points starting at self._tail_start: write (or queue)."""
        start = self._tail_start
        n = self._n
        self._tail_start += n
        if not self._bslz4 and self._deflate is None:
            with self._guard():
                self._set_length(start + n)
                self._write_rows(start, block)
            return
        pieces = []
        nbytes = block.nbytes
        pool = self._pool() if (self._executor is not None or self._workers > 0) else None
        if self._bslz4:
            compress = _compress_in_worker if pool is not None else bslz4.compress
        else:
            compress = functools.partial(_deflate_chunk, level=self._deflate)
        for offset, part in self._split(block):
            if pool is not None:
                pieces.append(((start, *offset), pool.submit(compress, part)))
            else:
                pieces.append(((start, *offset), compress(part)))
        self._queue.append((start + n, pieces, nbytes))
        self._queued_bytes += nbytes
        self._drain(self._max_inflight // 2 if len(self._queue) > self._max_inflight else None)

    def _split(self, block: np.ndarray):
        """(offset in the point axes, contiguous full-size chunk array) for each chunk of a
        block of n points; edge chunks are padded with the fill value."""
        ch = self._chunks[1:]
        shape = block.shape[1:]
        if shape == ch:
            yield (0,) * len(ch), np.ascontiguousarray(block)
            return
        grids = [range(0, s, c) for s, c in zip(shape, ch)]
        for offset in itertools.product(*grids):
            sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip(offset, ch, shape))
            part = block[(slice(None), *sl)]
            if part.shape[1:] != ch:
                full = np.full(self._chunks, self.fill_value, dtype=self.dtype)
                full[(slice(None), *(slice(0, e - 0) for e in part.shape[1:]))] = part
                part = full
            yield offset, np.ascontiguousarray(part)

    def _pool(self):
        if self._executor is not None:
            return self._executor
        if self._own_executor is None:
            self._own_executor = ThreadPoolExecutor(max(self._workers, 1),
                                                    thread_name_prefix="bslz4")
        return self._own_executor

    def _set_length(self, length: int) -> None:
        if self._length < length:  # HDF5's own call: h5py's resize() costs twice as much
            self._dset.id.set_extent((length, *self._cur))
            self._length = length

    def _write_rows(self, start: int, rows: np.ndarray) -> None:
        """Points at [start, start + len(rows)), inside the dataset's length, written by
        HDF5 (its own call: h5py's slice assignment costs 2-3x as much, 64 of them a flush
        for 64 counters)."""
        rows = np.ascontiguousarray(rows)
        space = self._dset.id.get_space()
        space.select_hyperslab((start, *(0 for _ in rows.shape[1:])), rows.shape)
        self._dset.id.write(h5py.h5s.create_simple(rows.shape), space, rows)

    def _drain(self, keep=None) -> None:
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
        with self._guard():
            self._set_length(ready[-1][0])
            write = self._dset.id.write_direct_chunk
            for _end, pieces, nbytes in ready:
                for offset, data in pieces:
                    write(offset, data)
                self._queued_bytes -= nbytes

    @contextmanager
    def _guard(self):
        """Writes that may fail: the length is set before the chunks are written (HDF5 writes
        inside the extent only), so a failure leaves it ahead of what is stored; from then
        on, flush() reports only the points stored before."""
        before = self._length
        try:
            yield
        except BaseException:
            self._failed_at = before if self._failed_at is None else min(self._failed_at,
                                                                         before)
            raise

    def flush(self, final: bool = False) -> int:
        """Write every appended point into the HDF5 dataset and return the number of points
        stored (== npoints). The partial tail is stored padded, so that its rewrites happen
        in place (:mod:`writer.hdf5.partial_chunks`); ``final=True`` (no more points will come:
        the end of a scan) stores it at its exact size. The caller flushes the file.
        After a failed write, the points stored before it (nothing more is written)."""
        if self._failed_at is not None:
            return min(self._length, self._failed_at)
        with self._guard():
            self._flush(final)
        return self._length

    def _flush(self, final: bool) -> None:
        self._drain(keep=0)
        end = self._tail_start + self._k
        if self._swmr_filtered():
            if self._tail_flushed < self._k:
                self._store_version(self._full_tail(), complete=False, length=end)
            else:
                self._set_length(end)
        elif (self._held and final) or (self._pad and not final and self._tail_flushed < self._k):
            self._store(self._full_tail(), padding=not final, length=end)
        elif self._tail_flushed < self._k:  # HDF5's own path
            self._set_length(end)
            self._write_rows(self._tail_start + self._tail_flushed,
                             self._tail[self._tail_flushed:self._k])
        else:
            self._set_length(end)
        self._tail_flushed = self._k

    def _store(self, block: np.ndarray, padding: bool, length: int) -> None:
        """Store the chunks of the chunk row ``block`` (at ``self._tail_start``) compressed,
        padded or at their exact size, over the padded versions the file may hold, and make
        the dataset ``length`` points long. A version that must grow is first written again
        at the new size, and the file flushed (with the old length), before the new bytes go
        in (see :mod:`writer.hdf5.partial_chunks`)."""
        write = self._dset.id.write_direct_chunk
        pieces, grown = [], False
        # points of the row in the file; after them, fill values (flush() sets them)
        filled = length - self._tail_start
        for offset, part in self._split(block):
            mask, data = self._compress_chunk(part, filled)
            size = len(data)
            old = self._held.get(offset)
            if padding:
                size = old[2] if old and size <= old[2] else capacity_for(size)
            coord = (self._tail_start, *offset)
            if old and size > old[2]:
                write(coord, padded(old[1], size), filter_mask=old[0])
                grown = True
            pieces.append((offset, coord, mask, data, size))
        if grown:
            self._dset.file.flush()
        self._set_length(length)
        self._held = {}
        for offset, coord, mask, data, size in pieces:
            write(coord, padded(data, size), filter_mask=mask)
            if padding:
                self._held[offset] = (mask, data, size)

    def _swmr_filtered(self) -> bool:
        return self._raw_mask != 0 and self._dset.file.swmr_mode

    def _store_version(self, block: np.ndarray, complete: bool, length: int) -> None:
        """SWMR mode: store the chunk row ``block`` (at ``self._tail_start``) so that no
        byte a reader may be reading changes, then make the dataset ``length`` points long.

        A reader (another process, any time) reads a chunk where the index it last read
        says: rewriting a compressed chunk where it lies could hand it half old, half new
        bytes (wrong values, or a decoder crash); and a version of another size goes to a new
        place (HDF5's SWMR mode never frees the old one, which readers may still use, nor
        reuses it: measured), left behind for good. So a partial chunk is stored raw from its
        first flush (filters skipped, a per-chunk HDF5 flag every reader understands) and
        rewritten in place from then on, at the same size: the bytes of points already there
        never change, only rows past them, and nothing is left behind. A chunk stored raw
        stays raw when it fills; a chunk that fills between two flushes is compressed
        (:meth:`_append`). A partial chunk found compressed (a file from an older version)
        gets one raw version at a new place. See docs/files.md."""
        write = self._dset.id.write_direct_chunk
        # longer first (a chunk is written inside the extent only); HDF5's SWMR flush order
        # puts the chunk index on disk before the length readers see
        self._set_length(length)
        versions, mask_changed = {}, False  # mask_changed: forget HDF5's last lookup
        for offset, part in self._split(block):
            coord = (self._tail_start, *offset)
            old = self._versions.get(offset)
            if old is not None and old[0] == self._raw_mask:  # raw: in place, prefix intact
                write(coord, part.tobytes(), filter_mask=self._raw_mask)
                versions[offset] = old
                mask_changed = True
                continue
            left = old[1] + old[2] if old is not None else 0
            mask, data, raw = 0, None, True  # a partial chunk: raw, rewritten in place after
            if complete:  # (a chunk never stored before: written compressed by _append)
                mask, data = self._compress_chunk(part)
                if old is not None and len(data) == old[1]:  # same size: HDF5 would overwrite
                    data = padded(data, len(data) + 1) if self._pad else None
                raw = data is None
            if raw and old is not None and old[1] == self._raw_nbytes and self._pad:
                if data is None:  # raw would overwrite this compressed version in place
                    mask, data = self._compress_chunk(part)
                raw, data = False, padded(data, self._raw_nbytes + 1)
            if raw:
                write(coord, part.tobytes(), filter_mask=self._raw_mask)
                versions[offset] = (self._raw_mask, self._raw_nbytes, left)
            else:
                write(coord, data, filter_mask=mask)
                versions[offset] = (mask, len(data), left)
            mask_changed |= versions[offset][0] != 0 or (old is not None and old[0] != 0)
        if mask_changed:
            self._forget_last_lookup()
        self._versions = {} if complete else versions
        self._held = {}

    def _forget_last_lookup(self) -> None:
        """HDF5 (2.0) remembers the chunk it last looked up, but after a
        ``write_direct_chunk`` with a filter mask it remembers the wrong mask: a read in this
        process would decode a raw chunk. Looking up a chunk past the dataset's end makes it
        forget (tests/test_swmr_files.py reads back after every flush)."""
        try:
            self._dset.id.read_direct_chunk(
                (self._tail_start + self._n, *(0,) * len(self.point_shape)))
        except (OSError, RuntimeError, KeyError, ValueError):
            pass

    def _compress_chunk(self, part: np.ndarray, points: int | None = None) -> tuple[int, bytes]:
        """(filter mask, stored bytes) of one full chunk, as HDF5 would store it. ``points``:
        how many of its points hold data (the rest is fill), when the chunk spans whole
        points: then only the part with data is compressed (same bytes)."""
        if self._bslz4:
            if points is not None and part.shape[1:] == tuple(self._cur):
                return 0, bslz4.compress_filled(part, points * int(np.prod(part.shape[1:])))
            return 0, bslz4.compress(part)
        if self._compressor is None:
            self._compressor = ChunkCompressor(self._dset)
        return self._compressor.compress(part)

    def close(self) -> int:
        """flush(final=True), then stop the thread pool if this appender made it."""
        try:
            return self.flush(final=True)
        finally:
            if self._own_executor is not None:
                self._own_executor.shutdown(wait=True)
                self._own_executor = None
            if self._compressor is not None:
                self._compressor.close()
                self._compressor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"DatasetAppender({self.name!r}, dtype={self.dtype}, "
                f"point_shape={self.point_shape}, chunks={self._chunks}, "
                f"npoints={self.npoints}, stored={self.stored})")
