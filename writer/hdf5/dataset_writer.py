"""Appending streamed points into one chunked, compressed HDF5 dataset: :class:`DatasetAppender`.

A dataset has shape ``(npoints, *point_shape)``; its chunk shape is decided in one place,
:func:`writer.hdf5.chunking.chunk_shape` (from dtype and point shape alone), and the compression
by :mod:`writer.hdf5.compression`.

The appender owns the points: they come in, are gathered per chunk row, go out as full rows,
and are flushed. How a chunk is stored (compressed in the pool or inline, raw, padded, its
versions, the SWMR rules, the dataset's length) is its :class:`~writer.hdf5.chunk_store.
ChunkStore`'s, in :mod:`writer.hdf5.chunk_store`.

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

import h5py
import numpy as np

from blissdata import bslz4

from .chunk_store import ChunkStore
from .chunking import chunk_shape
from .compression import dataset_is_bslz4, parse_compression

#: memory first given to the points of a chunk being filled (then doubled as needed)
TAIL_FIRST_BYTES = 16 * 1024


def default_fill_value(dtype):
    """NaN for float/complex dtypes, 0 for the others."""
    dt = np.dtype(dtype)
    return np.nan if dt.kind in "fc" else 0


def _immutable(arr: np.ndarray) -> bool:
    """True if the array's memory belongs to an immutable ``bytes`` object (e.g. decoded
    with np.frombuffer from a Redis reply): then no one can change it under us."""
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, bytes)


def _create(group: h5py.Group, name: str, dtype, point_shape, compression, fill_value, attrs,
            npoints, count_time) -> tuple[h5py.Dataset, tuple, bool]:
    """The dataset a new DatasetAppender appends to: (dataset, point shape, is bslz4)."""
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
    return dset, point_shape, setting.is_bslz4

def _as_points(points, dtype, point_shape, where, what="points") -> tuple[np.ndarray, bool]:
    """Return (points as an array of ``dtype``, whether we own its memory); ``where()``: the
    dataset, for the errors."""
    arr = points if isinstance(points, np.ndarray) else np.asarray(points)
    def expected():  # formatting a dtype costs: on error only
        return f"dtype {dtype} (or one that casts safely) and shape " \
               f"(n, *{point_shape})"
    if arr.ndim != len(point_shape) + 1:
        raise ValueError(f"{where()}: {what} of dtype {arr.dtype} shape {arr.shape} "
                         f"given, expected {expected()}")
    for d, e in zip(arr.shape[1:], point_shape):
        if e != -1 and d != e:
            raise ValueError(f"{where()}: {what} of shape {arr.shape} given, "
                             f"expected {expected()}")
    owned = False
    if arr.dtype != dtype:
        if not np.can_cast(arr.dtype, dtype, "safe"):
            raise ValueError(f"{where()}: {what} of dtype {arr.dtype} given, "
                             f"expected {expected()}")
        arr = arr.astype(dtype)
        owned = True
    return arr, owned

def _check_frames(chunks, nbytes, dtype, point_shape, validate, where) -> None:
    """Raise ValueError unless each bslz4 chunk holds one point of ``nbytes`` (``validate``:
    and its block structure is sound); ``where()``: the dataset, for the errors."""
    for i, c in enumerate(chunks):
        try:
            found = bslz4.uncompressed_nbytes(c)
        except ValueError as exc:
            raise ValueError(f"{where()}: compressed frame {i}: {exc}") from None
        if found != nbytes:
            raise ValueError(f"{where()}: compressed frame {i} holds {found} bytes, "
                             f"expected {nbytes} (dtype {dtype} shape "
                             f"{point_shape})")
        if validate:
            try:
                bslz4.check_chunk(c, dtype, point_shape)
            except ValueError as exc:
                raise ValueError(f"{where()}: compressed frame {i}: {exc}") from None


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
        dset, point_shape, is_bslz4 = _create(group, name, dtype, point_shape, compression,
                                              fill_value, attrs, npoints, count_time)
        self._setup(dset, point_shape, is_bslz4, executor, workers)

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
        fill = dset.fillvalue
        self.fill_value = fill if fill is not None else default_fill_value(self.dtype)
        self._cur = tuple(dset.shape[1:])  # current point extent (max so far in -1 dims)
        # how the chunks are stored: resuming on a partial chunk, it reads what to protect
        self._store = ChunkStore(dset, bslz4_setting, self.fill_value, executor, workers)
        self._compresses = self._store.compresses  # full rows compressed here, maybe in a pool
        # one frame per chunk, whole frame: precompressed frames can go in untouched
        self._direct_frames = (self._bslz4 and not self._varying
                               and self._chunks == (1, *point_shape))
        stored = dset.shape[0]
        self._tail_start = stored - stored % self._n
        self._point_nbytes = self.dtype.itemsize * int(np.prod(self._cur, dtype=np.int64))
        self._k = stored - self._tail_start
        self._tail = self._new_tail(self._k)
        self._tail_flushed = self._k  # tail points already in the file
        if self._k:  # resuming on a partial chunk
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
        return self._store.length

    @property
    def pending_bytes(self) -> int:
        """Bytes of point data this appender holds in memory: the chunks queued for
        compression/writing, the tail (the points of the chunk being filled, including
        those already flushed, kept to write the chunk whole once it fills) and the tail's
        compressed bytes as the file holds them (kept to rewrite them safely)."""
        return self._store.pending_bytes + self._k * self._point_nbytes

    @property
    def is_bslz4(self) -> bool:
        return self._bslz4

    # ------------------------------------------------------------------ appending
    def _where(self) -> str:
        return f"dataset {self._dset.name!r} in {self._dset.file.filename}"

    def append(self, points) -> None:
        """Append points (first axis = points; shape ``(n, *point_shape)``). For -1 dims
        the points may be smaller (padded) or bigger (the dataset grows)."""
        arr, owned = _as_points(points, self.dtype, self.point_shape, self._where)
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
            arr, _ = _as_points(a[np.newaxis], self.dtype, self.point_shape, self._where,
                                what=f"point {i}")
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
            pool = self._store.pool()
            if pool is not None:
                arrays = list(pool.map(self._decompress_one, chunks))
            else:
                arrays = [self._decompress_one(c) for c in chunks]
            self._append(np.stack(arrays), True)
            return
        _check_frames(chunks, self._point_nbytes, self.dtype, self.point_shape, validate,
                      self._where)
        if self._store.idle:  # nothing in flight: one resize, then the chunks as they are
            self._store.write_frames(self._tail_start, chunks)
            self._tail_start += len(chunks)
            return
        for c in chunks:
            start = self._tail_start
            data = bytes(c) if not isinstance(c, bytes) else c
            self._store.put_frame(start, data)
            self._tail_start += 1
            self._store.drain_some()

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
        self._store.set_extent(new)
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
        wait = self._compresses and not (owned or _immutable(arr))
        while i < m:
            if self._k == 0 and m - i >= n:
                # whole chunks straight from the caller's array
                j = i + (m - i) // n * n
                for s in range(i, j, n):
                    self._write_block(arr[s:s + n])
                i = j
                if wait:
                    self._store.drain(keep=0)
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
                if self._store.replace_partial(self._tail_start, tail):  # flushed partially
                    self._tail_start += n
                    self._store.end_replace()
                else:
                    self._write_block(tail)

    def _write_block(self, block: np.ndarray) -> None:
        """A complete chunk row of points starting at self._tail_start: write (or queue)."""
        start = self._tail_start
        self._tail_start += self._n
        self._store.write_row(start, block)

    def flush(self, final: bool = False) -> int:
        """Write every appended point into the HDF5 dataset and return the number of points
        stored (== npoints). The partial tail is stored padded, so that its rewrites happen
        in place (:mod:`writer.hdf5.partial_chunks`); ``final=True`` (no more points will come:
        the end of a scan) stores it at its exact size. The caller flushes the file.
        After a failed write, the points stored before it (nothing more is written)."""
        store = self._store
        if store.failed_at is not None:
            return min(store.length, store.failed_at)
        with store.guard():
            self._flush(final)
        return store.length

    def _flush(self, final: bool) -> None:
        self._store.drain(keep=0)
        self._store.store_partial(self._tail_start, self._tail, self._tail_flushed, self._k,
                                  self._full_tail, final)
        self._tail_flushed = self._k

    def close(self) -> int:
        """flush(final=True), then stop the thread pool if this appender's store made it."""
        try:
            return self.flush(final=True)
        finally:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"DatasetAppender({self.name!r}, dtype={self.dtype}, "
                f"point_shape={self.point_shape}, chunks={self._chunks}, "
                f"npoints={self.npoints}, stored={self.stored})")
