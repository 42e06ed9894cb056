"""Where the chunk shape of every streamed dataset is decided: :func:`chunk_shape`.

The writer's datasets have shape ``(npoints, *point_shape)``; the chunk's first axis counts
points. The choice depends on the dtype, the point shape and what the scan's header announces
(``npoints``, ``count_time``), never on timing, the compression or the machine: the same
stream of the same scan always gets the same layout.

Why the header: a chunk that is not full is rewritten at every flush (``max_lag_s``); its size
is what a flush costs and what an unfinished chunk holds. A slow scan's chunks are made small
enough to fill in about a minute, a short scan's no bigger than the scan.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["chunk_shape", "nominal_point_shape", "FRAME_BYTES", "TARGET_CHUNK_BYTES",
           "MAX_CHUNK_BYTES", "FILL_SECONDS", "MIN_CHUNK_POINTS", "UNKNOWN_LENGTH_POINTS",
           "varying_extent"]

#: a point at least this big is a "frame": one point per chunk
FRAME_BYTES = 256 * 1024
#: small points are grouped so that a chunk is about this big (rounded down to 2**k points)
TARGET_CHUNK_BYTES = 1024 * 1024
#: a single point bigger than this is split along its own axes so a chunk stays <= this
MAX_CHUNK_BYTES = 8 * 1024 * 1024
#: small points: a chunk holds at most the points of this many seconds at one per count_time
FILL_SECONDS = 64
#: ... but never fewer points than this (nor than the byte target allows)
MIN_CHUNK_POINTS = 64
#: a scan whose length is unknown (no ``npoints``): scalars get chunks of at most this many
#: points, since its last chunk is allocated whole in the file however few points it holds
#: (a partial chunk is stored raw, docs/files.md)
UNKNOWN_LENGTH_POINTS = 1024


def varying_extent(n_varying: int) -> int:
    """Nominal extent (and chunk extent) of each -1 dimension of a point shape: 1024 when
    the point has one varying dimension, 256 when it has two, 64 when it has three or more
    (so the nominal varying part stays at 1 Ki, 64 Ki or 256 Ki+ elements)."""
    return {0: 0, 1: 1024, 2: 256}.get(n_varying, 64)


def nominal_point_shape(point_shape) -> tuple:
    """The point shape with every -1 replaced by :func:`varying_extent`."""
    shape = tuple(int(d) for d in point_shape)
    nominal = varying_extent(sum(1 for d in shape if d == -1))
    return tuple(nominal if d == -1 else d for d in shape)


def _pow2_at_least(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def chunk_shape(dtype, point_shape, npoints=None, count_time=None) -> tuple:
    """Chunk shape ``(points per chunk, *extent per point axis)`` for a dataset of points of
    ``dtype`` and ``point_shape`` (``-1`` = a dimension that varies per point).

    Rules (deterministic, from dtype and point shape alone):

    1. Each ``-1`` dimension counts with its nominal extent (:func:`varying_extent`: 1024
       for one varying dimension, 256 each for two, 64 each for more); the chunk's extent in
       that dimension is that nominal extent, and the dataset is resizable there.
    2. ``point_bytes = itemsize * prod(nominal point shape)``.
    3. A frame (``point_bytes >= FRAME_BYTES`` = 256 KiB): one point per chunk. If the point
       is bigger than ``MAX_CHUNK_BYTES`` (8 MiB) it is split along its first axis (then the
       next ones if one slice is still too big) into equal-as-possible pieces, so one chunk
       is <= 8 MiB (e.g. 4096x4096 uint32 = 64 MiB -> chunk (1, 512, 4096)).
    4. A small point (scalars, spectra): ``2**k`` points per chunk, the largest power of two
       with ``2**k * point_bytes <= TARGET_CHUNK_BYTES`` (1 MiB), at least 1 (e.g. float64
       scalars -> 131072 points per chunk; 4096-channel uint32 spectra -> 64).
    5. A small point, from the scan's header: no more points per chunk than the power of two
       at or above ``FILL_SECONDS / count_time`` (a 10 Hz scan: 1024) but at least
       ``MIN_CHUNK_POINTS`` (64, or what rule 4 gives if fewer); then, with ``npoints``, the
       ``npoints`` are cut into equal chunks no bigger than that (100,000 points at most
       65,536 per chunk: 2 chunks of 50,000), so that the last chunk of a scan that ends as
       announced holds no fill values. Missing, zero or non-numeric values are ignored.
    6. Scalars of a scan without ``npoints`` (a timescan, a loop): at most
       ``UNKNOWN_LENGTH_POINTS`` (1024) points per chunk, whatever rules 4 and 5 allow. The
       last chunk takes its whole size in the file however few points it holds: 64 counters
       of a 1000-point timescan take 0.5 MB, not 64 MiB. (Points with a shape keep rule 4: a
       spectrum's chunk is still up to 1 MiB, its last one allocated whole.)
    """
    dt = np.dtype(dtype)
    shape = tuple(int(d) for d in point_shape)
    if any(d < -1 or d == 0 for d in shape):
        raise ValueError(f"point shape {shape}: dimensions must be >= 1 or -1 (varying)")
    itemsize = max(dt.itemsize, 1)
    nominal = list(nominal_point_shape(shape))
    point_bytes = itemsize * math.prod(nominal)
    if point_bytes >= FRAME_BYTES:
        for axis in range(len(nominal)):
            total = itemsize * math.prod(nominal[axis:])
            if total <= MAX_CHUNK_BYTES:
                break
            inner = itemsize * math.prod(nominal[axis + 1:])
            max_extent = max(1, MAX_CHUNK_BYTES // inner)
            pieces = -(-nominal[axis] // max_extent)
            nominal[axis] = -(-nominal[axis] // pieces)
            if itemsize * math.prod(nominal[axis:]) <= MAX_CHUNK_BYTES:
                break
        return (1, *nominal)
    per_chunk = 1 << max(0, int(TARGET_CHUNK_BYTES // point_bytes).bit_length() - 1)
    cap = per_chunk
    if _positive(count_time):
        cap = max(min(cap, _pow2_at_least(FILL_SECONDS / float(count_time))),
                  min(per_chunk, MIN_CHUNK_POINTS))
    if _positive(npoints):  # equal chunks, the last one full when the scan ends as announced
        n = int(npoints)
        cap = -(-n // -(-n // cap))
    elif not shape:  # scalars, length unknown: the last chunk is allocated whole (rule 6)
        cap = min(cap, UNKNOWN_LENGTH_POINTS)
    return (cap, *nominal)


def _positive(value) -> bool:
    try:
        return bool(value) and float(value) > 0 and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
