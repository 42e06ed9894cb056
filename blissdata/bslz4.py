"""Codec for the HDF5 Bitshuffle+LZ4 chunk format ("bslz4").

This is the byte layout that the HDF5 bitshuffle filter (id 32008, as installed by
``hdf5plugin.Bitshuffle(cname="lz4")``) stores for one chunk, so a chunk made here can be
stored with ``dataset.id.write_direct_chunk`` and a chunk read with ``read_direct_chunk`` can
be decoded here::

    offset 0   uint64 big-endian   number of uncompressed bytes in the chunk
    offset 8   uint32 big-endian   block size in BYTES (block size in elements * itemsize)
    offset 12  blocks, as bitshuffle.compress_lz4 writes them:
               for each full block and for the last partial block (rounded down to a
               multiple of 8 elements): uint32 big-endian compressed size + LZ4 data of
               the bit-shuffled block; then the remaining (< 8) elements copied raw.

The default block size is bitshuffle's own (``bshuf_default_block_size``): 8192 bytes /
itemsize, rounded down to a multiple of 8 elements, at least 128 elements. The decoder takes
the block size from the header, so chunks made with any valid block size decode.

GIL and threads (measured on the 2-core dev machine, bitshuffle 0.5.2 PyPI wheel, 512x512
uint16 frames of Poisson counts on a smooth pattern, best of 5):

* bitshuffle's ``compress_lz4`` / ``decompress_lz4`` release the GIL: a pure-Python loop in
  another thread runs at 100% of its speed while a thread compresses.
* The PyPI wheel is built with OpenMP (it vendors ``bitshuffle.libs/libgomp*.so``): ONE call
  already splits its blocks over all cores (process CPU time = 2x wall time). So a plain
  thread pool gains little (400 frames: serial 0.103-0.124 s, pool of 2 threads 0.101-0.103 s)
  and oversubscribes the cores (each worker runs an OpenMP team): a compressing thread next to
  a busy Python thread slowed to ~5% of its speed.
* With OpenMP limited to 1 thread per worker (:func:`set_openmp_threads`), one thread does
  400 frames in 0.150-0.189 s (~1.1-1.4 GB/s, like HDF5's own filter, which hdf5plugin builds
  without OpenMP) and a pool of 2 in 0.085-0.103 s: ~1.8x on 2 cores.

* Writing 1000 frames with DatasetAppender (bench/bench_storage.py, 6 interleaved runs):
  compressing on the caller's thread with the wheel's OpenMP 0.305-0.428 s, a pool of 2
  single-OpenMP-thread workers 0.328-0.396 s, a pool of 1 0.425-0.515 s: a tie on 2 cores.

So ``writer.hdf5.dataset_writer.DatasetAppender`` compresses on the caller's thread when bitshuffle
has OpenMP (:func:`openmp_available`), and in a thread pool whose workers run bitshuffle with
one OpenMP thread each when it has not, or when given an executor or ``workers > 0`` (HDF5
runs its own filters on one thread, under h5py's global lock, and hdf5plugin's build has no
OpenMP).

Bad input raises ValueError saying what was wrong. The chunk's block structure is walked
before calling into C (bitshuffle's decoder trusts the per-block sizes and would read past the
end of a truncated buffer).
"""

from __future__ import annotations

import ctypes
import struct

import bitshuffle
import bitshuffle.ext  # noqa: F401  (loads the OpenMP runtime it links, if any)
import numpy as np

__all__ = ["compress", "decompress", "uncompressed_nbytes", "block_size_bytes",
           "check_chunk", "set_openmp_threads", "openmp_available", "HEADER_SIZE"]

HEADER_SIZE = 12
_HEADER = struct.Struct(">QI")
_BLOCK_SIZE = struct.Struct(">I")

# bitshuffle constants (bitshuffle_core.h); they must never change, or old data won't decode
_TARGET_BLOCK_SIZE_B = 8192
_BLOCKED_MULT = 8
_MIN_RECOMMEND_BLOCK = 128


_openmp = None


def _openmp_runtimes() -> list:
    """The OpenMP runtimes (libgomp/libomp) mapped in this process, as ctypes libraries."""
    global _openmp
    if _openmp is None:
        paths = set()
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    path = line.split()[-1] if "/" in line else ""
                    name = path.rsplit("/", 1)[-1]
                    if name.startswith(("libgomp", "libomp", "libiomp")) and ".so" in name:
                        paths.add(path)
        except OSError:  # not Linux: leave OpenMP alone
            pass
        libs = []
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)  # already loaded: the same instance
                lib.omp_set_num_threads.argtypes = [ctypes.c_int]
                libs.append(lib)
            except (OSError, AttributeError):
                pass
        _openmp = libs
    return _openmp


def openmp_available() -> bool:
    """True if bitshuffle runs with an OpenMP runtime (one call then uses all cores)."""
    return bool(_openmp_runtimes())


def set_openmp_threads(n: int) -> bool:
    """Make bitshuffle calls made FROM THE CALLING THREAD use ``n`` OpenMP threads (the
    PyPI wheel uses all cores by default). Returns False if no OpenMP runtime is loaded
    (a bitshuffle built without OpenMP: nothing to do)."""
    libs = _openmp_runtimes()
    for lib in libs:
        lib.omp_set_num_threads(int(n))
    return bool(libs)


def _default_block_elements(itemsize: int) -> int:
    block = _TARGET_BLOCK_SIZE_B // itemsize
    block = (block // _BLOCKED_MULT) * _BLOCKED_MULT
    return max(block, _MIN_RECOMMEND_BLOCK)


def block_size_bytes(dtype) -> int:
    """Block size in bytes that the HDF5 filter (and :func:`compress`) uses for ``dtype``."""
    itemsize = np.dtype(dtype).itemsize
    return _default_block_elements(itemsize) * itemsize


def compress(array) -> bytes:
    """Compress a whole array into one bslz4 chunk (header + bitshuffle/LZ4 blocks).

    The array is taken in C order; its dtype's itemsize is the element size. Releases the GIL
    while compressing.
    """
    arr = np.ascontiguousarray(array)
    if arr.dtype.hasobject or arr.dtype.itemsize == 0:
        raise ValueError(f"bslz4.compress: dtype {arr.dtype} cannot be bitshuffled")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    itemsize = arr.dtype.itemsize
    block = _default_block_elements(itemsize)
    # bitshuffle works on a flat buffer of elements; a 1-D view avoids shape surprises
    body = bitshuffle.compress_lz4(arr.reshape(-1), block)
    return _HEADER.pack(arr.nbytes, block * itemsize) + body.tobytes()


def compress_filled(array, filled: int) -> bytes:
    """:func:`compress`, the same bytes, for an array whose elements from ``filled`` on (C
    order) are all the same value (a chunk partly filled, the rest fill value): blocks are
    compressed independently, so only those holding data and one of the rest are; a 1 MiB
    chunk of a few counter points costs a few blocks, not 128."""
    arr = np.ascontiguousarray(array)
    flat = arr.reshape(-1)
    if arr.dtype.hasobject or arr.dtype.itemsize == 0 or flat.size == 0:
        return compress(arr)
    block = _default_block_elements(arr.dtype.itemsize)
    total = flat.size // block
    used = -(-max(0, int(filled)) // block)  # blocks holding data
    if flat.size % block or used >= total - 1:
        return compress(arr)  # a trailing partial block, or nothing to save
    head = bitshuffle.compress_lz4(flat[:used * block], block).tobytes() if used else b""
    rest = bitshuffle.compress_lz4(flat[-block:], block).tobytes()
    return _HEADER.pack(arr.nbytes, block * arr.dtype.itemsize) + head + rest * (total - used)


def uncompressed_nbytes(chunk) -> int:
    """Number of uncompressed bytes a chunk holds, read from its header."""
    if len(chunk) < HEADER_SIZE:
        raise ValueError(f"bslz4 chunk truncated: {len(chunk)} bytes, "
                         f"expected at least the {HEADER_SIZE}-byte header")
    return _HEADER.unpack_from(chunk, 0)[0]


def check_chunk(chunk, dtype, shape, padded: bool = False) -> None:
    """Check a chunk's header and block structure against ``dtype``/``shape``, without
    decompressing. Raises ValueError saying what is wrong (expected vs found).
    ``padded=True`` accepts bytes after the last block (as HDF5's decoder does)."""
    _check(memoryview(chunk).cast("B"), np.dtype(dtype), tuple(int(d) for d in shape), padded)


def _check(buf: memoryview, dtype: np.dtype, shape: tuple, padded: bool = False) -> int:
    """Validate; return the block size in elements."""
    n = len(buf)
    if n < HEADER_SIZE:
        raise ValueError(f"bslz4 chunk truncated: {n} bytes, "
                         f"expected at least the {HEADER_SIZE}-byte header")
    nbytes, block_bytes = _HEADER.unpack_from(buf, 0)
    itemsize = dtype.itemsize
    nelem = 1
    for d in shape:
        nelem *= d
    expected = nelem * itemsize
    if nbytes != expected:
        raise ValueError(f"bslz4 chunk header says {nbytes} uncompressed bytes, expected "
                         f"{expected} for dtype {dtype} shape {shape}")
    if block_bytes == 0 or block_bytes % itemsize:
        raise ValueError(f"bslz4 chunk header block size {block_bytes} bytes is not a "
                         f"positive multiple of the itemsize {itemsize} of dtype {dtype}")
    block = block_bytes // itemsize
    if block % _BLOCKED_MULT:
        raise ValueError(f"bslz4 chunk header block size {block} elements is not a "
                         f"multiple of {_BLOCKED_MULT}")
    # walk the blocks: sizes of the LZ4 blocks, then the raw leftover elements
    nblocks = nelem // block
    last = nelem % block
    last -= last % _BLOCKED_MULT
    leftover = (nelem % _BLOCKED_MULT) * itemsize
    pos = HEADER_SIZE
    unpack = _BLOCK_SIZE.unpack_from
    for i in range(nblocks + (1 if last else 0)):
        if pos + 4 > n:
            raise ValueError(f"bslz4 chunk truncated: {n} bytes, block {i} header at byte "
                             f"{pos} needs {pos + 4}")
        size = unpack(buf, pos)[0]
        pos += 4 + size
        if pos > n:
            raise ValueError(f"bslz4 chunk truncated: {n} bytes, block {i} ends at byte {pos}")
    if pos + leftover > n or (pos + leftover < n and not padded):
        raise ValueError(f"bslz4 chunk size {n} bytes does not match its blocks: expected "
                         f"{pos + leftover} bytes ({pos} of blocks + {leftover} raw)")
    return block


def decompress(chunk, dtype, shape) -> np.ndarray:
    """Decode one bslz4 chunk into a new array of ``dtype`` and ``shape``.

    Raises ValueError for a truncated chunk, a header that doesn't match dtype*shape, or
    data that doesn't decode. Releases the GIL while decompressing.
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    buf = memoryview(chunk).cast("B")
    block = _check(buf, dtype, shape)
    nelem = int(np.prod(shape, dtype=np.int64))
    if nelem == 0:
        return np.empty(shape, dtype)
    body = np.frombuffer(buf, dtype=np.uint8, offset=HEADER_SIZE)
    try:
        out = bitshuffle.decompress_lz4(body, (nelem,), dtype, block)
    except Exception as exc:  # bitshuffle raises RuntimeError with an error code
        raise ValueError(f"bslz4 chunk of {len(buf)} bytes does not decode as dtype {dtype} "
                         f"shape {shape}: {exc}") from exc
    return out.reshape(shape)
