"""The chunk row being filled, as the file holds it: :class:`LastRow`, the part of a
:class:`~writer.hdf5.chunk_store.ChunkStore` that stores partial chunks.

It keeps the versions of the last row's chunks that the file holds and stores new ones
without putting the points already there at risk: padded, so that HDF5 rewrites them in place
(:mod:`writer.hdf5.partial_chunks`), or, in SWMR mode, raw and rewritten in place
(:meth:`LastRow.store_version`: the SWMR rules). The ChunkStore decides when (at a flush, when
the row fills); :func:`last_chunks` reads what a resumed dataset's last row holds. Also here,
used by both: :func:`split_chunks` (a row into its chunks) and :func:`write_rows` (HDF5's own
path).
"""

from __future__ import annotations

import itertools

import h5py
import numpy as np

from blissdata import bslz4

from .compression import dataset_is_bslz4
from .partial_chunks import ChunkCompressor, capacity_for, padded, padding_tolerated

__all__ = ["LastRow", "last_chunks", "split_chunks", "write_rows"]


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


def split_chunks(block: np.ndarray, chunks: tuple, fill_value, dtype):
    """(offset in the point axes, contiguous full-size chunk array) for each chunk of a
    block of n points (``chunks``: the dataset's chunk shape); edge chunks are padded with the
    fill value."""
    ch = chunks[1:]
    shape = block.shape[1:]
    if shape == ch:
        yield (0,) * len(ch), np.ascontiguousarray(block)
        return
    grids = [range(0, s, c) for s, c in zip(shape, ch)]
    for offset in itertools.product(*grids):
        sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip(offset, ch, shape))
        part = block[(slice(None), *sl)]
        if part.shape[1:] != ch:
            full = np.full(chunks, fill_value, dtype=dtype)
            full[(slice(None), *(slice(0, e - 0) for e in part.shape[1:]))] = part
            part = full
        yield offset, np.ascontiguousarray(part)


def write_rows(dset: h5py.Dataset, start: int, rows: np.ndarray) -> None:
    """Points at [start, start + len(rows)), inside the dataset's length, written by
    HDF5 (its own call: h5py's slice assignment costs 2-3x as much, 64 of them a flush
    for 64 counters)."""
    rows = np.ascontiguousarray(rows)
    space = dset.id.get_space()
    space.select_hyperslab((start, *(0 for _ in rows.shape[1:])), rows.shape)
    dset.id.write(h5py.h5s.create_simple(rows.shape), space, rows)


class LastRow:
    """The chunks of the row being filled as the file holds them, and how new versions of
    them are stored (padded; raw in SWMR mode). ``set_length(n)``: the owner's call that
    makes the dataset ``n`` points long (set between the writes, see :meth:`store` and
    :meth:`store_version`). Resuming on a dataset whose last chunk is partial, what the file
    holds is what to protect.

    ``pads``: the filters tolerate padding (else HDF5's own path rewrites a partial chunk).
    """

    def __init__(self, dset: h5py.Dataset, bslz4_setting: bool, fill_value, set_length):
        self._dset = dset
        self._dtype = dset.dtype
        self._chunks = tuple(dset.chunks)
        self._n = self._chunks[0]
        self._bslz4 = bslz4_setting
        self._fill_value = fill_value
        self._set_length = set_length
        self._cur = tuple(dset.shape[1:])  # current point extent (max so far in -1 dims)
        plist = dset.id.get_create_plist()
        self.pads = padding_tolerated(plist)  # see ChunkStore.store_partial()
        self._raw_mask = (1 << plist.get_nfilters()) - 1  # every filter skipped: stored raw
        self._raw_nbytes = self._dtype.itemsize * int(np.prod(self._chunks, dtype=np.int64))
        self._compressor = None  # made when first needed (filters other than bslz4)
        # the row's chunks as the file holds them, padded:
        # offset in the point axes -> (filter mask, compressed bytes, stored size)
        self._held: dict[tuple, tuple[int, bytes, int]] = {}
        # the same in SWMR mode, where a stored version is never overwritten unless it is
        # raw: offset -> (filter mask, stored size, bytes of older versions left behind)
        self._versions: dict[tuple, tuple[int, int, int]] = {}
        if dset.shape[0] % self._n:  # resuming on a partial chunk: what to protect
            for offset, (mask, data) in last_chunks(dset).items():
                self._versions[offset] = (mask, len(data), 0)
                if self.pads:
                    self._held[offset] = (mask, data, len(data))

    @property
    def held_bytes(self) -> int:
        """The row's compressed bytes as the file holds them (kept to rewrite them safely)."""
        return sum(len(data) for _, data, _ in self._held.values())

    def holds_padded(self) -> bool:
        """The file holds padded versions of the row's chunks (flushed partially)."""
        return bool(self._held)

    def swmr_versions(self) -> bool:
        """In SWMR mode, the file holds versions of the row's chunks (stored partially)."""
        return bool(self._versions) and self.swmr_filtered()

    def swmr_filtered(self) -> bool:
        return self._raw_mask != 0 and self._dset.file.swmr_mode

    def set_extent(self, extent: tuple) -> None:
        """The point extent grew (varying dimensions)."""
        self._cur = extent

    def store(self, start: int, block: np.ndarray, padding: bool, length: int) -> None:
        """Store the chunks of the chunk row ``block`` (at ``start``) compressed, padded or at
        their exact size, over the padded versions the file may hold, and make the dataset
        ``length`` points long. A version that must grow is first written again at the new
        size, and the file flushed (with the old length), before the new bytes go in (see
        :mod:`writer.hdf5.partial_chunks`)."""
        write = self._dset.id.write_direct_chunk
        pieces, grown = [], False
        # points of the row in the file; after them, fill values (flush() sets them)
        filled = length - start
        for offset, part in split_chunks(block, self._chunks, self._fill_value, self._dtype):
            mask, data = self._compress_chunk(part, filled)
            size = len(data)
            old = self._held.get(offset)
            if padding:
                size = old[2] if old and size <= old[2] else capacity_for(size)
            coord = (start, *offset)
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

    def store_version(self, start: int, block: np.ndarray, complete: bool,
                      length: int) -> None:
        """SWMR mode: store the chunk row ``block`` (at ``start``) so that no byte a reader
        may be reading changes, then make the dataset ``length`` points long.

        A reader (another process, any time) reads a chunk where the index it last read
        says: rewriting a compressed chunk where it lies could hand it half old, half new
        bytes (wrong values, or a decoder crash); and a version of another size goes to a new
        place (HDF5's SWMR mode never frees the old one, which readers may still use, nor
        reuses it: measured), left behind for good. So a partial chunk is stored raw from its
        first flush (filters skipped, a per-chunk HDF5 flag every reader understands) and
        rewritten in place from then on, at the same size: the bytes of points already there
        never change, only rows past them, and nothing is left behind. A chunk stored raw
        stays raw when it fills; a chunk that fills between two flushes is compressed
        (:meth:`ChunkStore.write_row`). A partial chunk found compressed (a file from an
        older version) gets one raw version at a new place. See docs/files.md."""
        write = self._dset.id.write_direct_chunk
        # longer first (a chunk is written inside the extent only); HDF5's SWMR flush order
        # puts the chunk index on disk before the length readers see
        self._set_length(length)
        versions, mask_changed = {}, False  # mask_changed: forget HDF5's last lookup
        for offset, part in split_chunks(block, self._chunks, self._fill_value, self._dtype):
            coord = (start, *offset)
            old = self._versions.get(offset)
            if old is not None and old[0] == self._raw_mask:  # raw: in place, prefix intact
                write(coord, part.tobytes(), filter_mask=self._raw_mask)
                versions[offset] = old
                mask_changed = True
                continue
            left = old[1] + old[2] if old is not None else 0
            mask, data, raw = 0, None, True  # a partial chunk: raw, rewritten in place after
            if complete:  # (a chunk never stored before: written compressed by write_row)
                mask, data = self._compress_chunk(part)
                if old is not None and len(data) == old[1]:  # same size: HDF5 would overwrite
                    data = padded(data, len(data) + 1) if self.pads else None
                raw = data is None
            if raw and old is not None and old[1] == self._raw_nbytes and self.pads:
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
            self._forget_last_lookup(start)
        self._versions = {} if complete else versions
        self._held = {}

    def _forget_last_lookup(self, start: int) -> None:
        """HDF5 (2.0) remembers the chunk it last looked up, but after a
        ``write_direct_chunk`` with a filter mask it remembers the wrong mask: a read in this
        process would decode a raw chunk. Looking up a chunk past the dataset's end makes it
        forget (tests/test_swmr_files.py reads back after every flush)."""
        try:
            self._dset.id.read_direct_chunk(
                (start + self._n, *(0,) * (len(self._chunks) - 1)))
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

    def close(self) -> None:
        """Close the compressor (if one was made)."""
        if self._compressor is not None:
            self._compressor.close()
            self._compressor = None
