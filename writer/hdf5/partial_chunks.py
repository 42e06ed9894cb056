"""How the writer stores a chunk that is not full yet, so that rewriting it never puts points
already in the file at risk.

The problem: the writer flushes the last, partial chunk of a dataset every ``max_lag_s`` and
rewrites it whole as points arrive. Compressed, each version has another size, and HDF5 then
frees the old chunk before allocating the new one; when the old chunk ends the file (it
usually does) the new one lands at the same address. Between that write and the next
metadata flush the file's index still describes the old chunk over the new bytes: a crash
there, or a disk that fills mid-write, leaves points already reported durable unreadable
(a torn Bitshuffle/LZ4 chunk can even crash the reader).

The answer here: a partial chunk is stored compressed but *padded* with zeros to a capacity
(twice its compressed size when first stored). Every rewrite that fits has the same size,
HDF5 writes it in place, and the index stays right whatever happens between the write and
the flush: the new bytes are a complete chunk holding the old points and more. The decoders
used here stop at the end of their compressed stream and ignore what follows (checked for
each in the tests), which also makes a shorter rewrite safe: the old index entry reads a
valid chunk followed by leftovers. When a rewrite outgrows the capacity, the bytes already
stored are first written again at the new size (HDF5 may put them at the same address: the
bytes there do not change) and the file is flushed; only then do the new bytes go in, in
place. When the chunk fills up, or the stream ends, it is stored at its exact size.

Other filters (Blosc2 and Fletcher32 refuse trailing bytes; others are untested) keep HDF5's
normal path: rewrites there change size, with the risk above (documented in the README).
"""

from __future__ import annotations

import itertools

import h5py
import numpy as np

__all__ = ["padding_tolerated", "capacity_for", "padded", "ChunkCompressor"]

#: filters whose decoder ignores bytes after its compressed stream (each tested): shuffle,
#: deflate, Bitshuffle, Zstd
PADDING_TOLERANT = {1, 2, 32008, 32015}

_scratch_names = itertools.count()


def padding_tolerated(dcpl) -> bool:
    """Whether every filter of a dataset creation property list tolerates padding."""
    ids = {dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())}
    return bool(ids) and ids <= PADDING_TOLERANT


def capacity_for(nbytes: int) -> int:
    """Room to keep for a partial chunk now ``nbytes`` compressed: twice that, in 4 KiB
    pages (a few growths per chunk, at most half of it padding)."""
    return -(-2 * nbytes // 4096) * 4096


def padded(data: bytes, size: int) -> bytes:
    """``data`` followed by zeros up to ``size`` bytes."""
    return bytes(data) + bytes(size - len(data))


class ChunkCompressor:
    """Compress one chunk exactly as HDF5 would for ``dataset``, for any filter pipeline:
    HDF5 itself runs the filters on a one-chunk dataset in an in-memory file, and the
    stored bytes are read back with ``read_direct_chunk``."""

    def __init__(self, dataset: h5py.Dataset):
        self._file = h5py.File(f"partial-chunk-{next(_scratch_names)}", "w", driver="core",
                               backing_store=False)
        chunks = dataset.chunks
        space = h5py.h5s.create_simple(chunks, chunks)
        no_cache = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        no_cache.set_chunk_cache(0, 0, 1.0)  # the chunk goes straight through the filters
        dsid = h5py.h5d.create(self._file.id, b"chunk", dataset.id.get_type(), space,
                               dcpl=dataset.id.get_create_plist(), dapl=no_cache)
        self._dset = h5py.Dataset(dsid)
        self._origin = (0,) * len(chunks)

    def compress(self, chunk: np.ndarray) -> tuple[int, bytes]:
        """(filter mask, stored bytes) of a full chunk."""
        self._dset[...] = chunk
        return self._dset.id.read_direct_chunk(self._origin)

    def close(self) -> None:
        self._file.close()
