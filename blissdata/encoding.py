"""How a stream's points become Redis stream entries, and back.

One entry holds a batch of consecutive points. Its ID is ``<index of first point>-1`` and its
fields are: ``n`` number of points, ``d`` payload, plus per encoding:

- ``numeric`` fixed shape: ``d`` = the points' bytes, C order, the declared dtype.
- ``numeric`` with -1 dims: ``s`` = JSON list of each point's shape; ``d`` = concatenated bytes.
- ``bslz4``: ``z`` = JSON list of each chunk's byte length; ``d`` = concatenated chunks in the
  HDF5 Bitshuffle+LZ4 chunk format (one chunk = one point).
- ``json``: ``d`` = JSON list of the points.
- ``references`` (frames in a detector's own files): like ``json``, each point a
  ``{"file", "dataset", "index"}`` dict.

The seal is the entry ``<number of points>-1`` with one field ``end`` = number of points.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import numpy as np

from .exceptions import EventTooLargeError, MalformedEntryError

ENCODINGS = ("numeric", "bslz4", "json", "references")

# Batches are cut into entries of about this size: Redis/Valkey take entries of a few
# hundred KiB fastest (bench_publish, 512x512 uint16 frames sent 16 per call: 1 frame per
# entry 1.0 of raw XADD, 2 per entry 0.82, 4 per entry 0.72, 16 per entry ~0.3).
ENTRY_TARGET_BYTES = 2**19


@dataclass(frozen=True)
class StreamDefinition:
    name: str
    encoding: str = "numeric"
    dtype: str | None = None
    shape: tuple = ()
    info: dict = field(default_factory=dict)

    @property
    def varying(self) -> bool:
        return any(d == -1 for d in self.shape)

    @property
    def is_array(self) -> bool:
        return self.encoding in ("numeric", "bslz4")

    @functools.cached_property
    def point_nbytes(self) -> int | None:
        if not self.is_array or self.varying:
            return None
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))

    def to_json(self) -> dict:
        return {"name": self.name, "encoding": self.encoding, "dtype": self.dtype,
                "shape": list(self.shape), "info": self.info}

    @classmethod
    def from_json(cls, d: dict) -> "StreamDefinition":
        return cls(name=d["name"], encoding=d["encoding"], dtype=d.get("dtype"),
                   shape=tuple(d.get("shape") or ()), info=d.get("info") or {})


def make_definition(name, dtype=None, shape=(), encoding="numeric", info=None) -> StreamDefinition:
    """Check a stream declaration and normalise it; ValueError names the stream."""
    if not isinstance(name, str) or not name or any(c in name for c in "{}"):
        raise ValueError(f"stream name {name!r}: must be a non-empty string without braces")
    if encoding not in ENCODINGS:
        raise ValueError(f"stream {name!r}: encoding {encoding!r} is not one of {ENCODINGS}")
    if encoding in ("numeric", "bslz4"):
        if dtype is None:
            raise ValueError(f"stream {name!r}: a {encoding} stream needs a dtype")
        try:
            dt = np.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"stream {name!r}: dtype {dtype!r} is not a numpy dtype") from exc
        if dt.kind not in "biufc":
            raise ValueError(f"stream {name!r}: dtype {dt} is not numeric")
        shape = tuple(int(d) for d in shape)
        if any(d < -1 or d == 0 for d in shape):
            raise ValueError(f"stream {name!r}: shape {shape} has a dimension < 1 other than -1")
        if encoding == "bslz4" and (not shape or -1 in shape):
            raise ValueError(f"stream {name!r}: bslz4 frames need a fixed shape of >= 1 dimension")
        dtype = dt.str
    else:
        dtype, shape = None, ()
    return StreamDefinition(name, encoding, dtype, shape, dict(info or {}))


def _cast(defn: StreamDefinition, arr: np.ndarray) -> np.ndarray:
    """`arr` in the stream's dtype: a safe or same-kind cast, or integers that fit."""
    dt = np.dtype(defn.dtype)
    if arr.dtype == dt:
        return arr
    fits = arr.dtype.kind != "O" and np.can_cast(arr.dtype, dt, casting="same_kind")
    if arr.dtype.kind in "biu" and dt.kind in "iu":
        info = np.iinfo(dt)
        fits = not arr.size or (arr.min() >= info.min and arr.max() <= info.max)
        if not fits:
            raise ValueError(f"stream {defn.name!r}: values [{arr.min()}, {arr.max()}] do "
                             f"not fit dtype {dt}")
    if not fits:
        raise ValueError(f"stream {defn.name!r}: expected dtype {dt}, got {arr.dtype}")
    return arr.astype(dt)


def as_points(defn: StreamDefinition, data) -> np.ndarray:
    """One point or a batch -> array of shape (n, *point_shape); ValueError if it does not fit."""
    arr = _cast(defn, np.asarray(data))
    nd = len(defn.shape)
    if arr.ndim == nd:
        arr = arr[np.newaxis]
    elif arr.ndim != nd + 1:
        raise ValueError(
            f"stream {defn.name!r}: expected a point of shape {defn.shape} or a batch "
            f"(n, {', '.join(map(str, defn.shape))}), got shape {arr.shape}")
    if arr.shape[1:] != defn.shape:
        raise ValueError(f"stream {defn.name!r}: expected point shape {defn.shape}, "
                         f"got {arr.shape[1:]}")
    return np.ascontiguousarray(arr)


def _check_varying_point(defn, point) -> np.ndarray:
    arr = _cast(defn, np.asarray(point))
    if arr.ndim != len(defn.shape) or any(
            d != -1 and d != g for d, g in zip(defn.shape, arr.shape)):
        raise ValueError(f"stream {defn.name!r}: expected point shape {defn.shape} "
                         f"(-1 = any), got {arr.shape}")
    return np.ascontiguousarray(arr)


def encode(defn: StreamDefinition, data, max_event_bytes: int) -> list[tuple[int, dict]]:
    """Points -> list of (number of points, entry fields), each entry <= max_event_bytes."""
    if defn.encoding in ("json", "references"):
        points = data if isinstance(data, list) else [data]
        if defn.encoding == "references":
            points = [_check_reference(defn, p) for p in points]
        encoded = [json.dumps(p, separators=(",", ":")) for p in points]
        return _pack(defn, encoded, [len(e) for e in encoded], max_event_bytes,
                     lambda part: {"d": "[" + ",".join(part) + "]"})
    if defn.encoding == "bslz4":
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        chunks = [bytes(c) for c in chunks]
        return _pack(defn, chunks, [len(c) for c in chunks], max_event_bytes,
                     lambda part: {"z": json.dumps([len(c) for c in part]),
                                   "d": b"".join(part)})
    if defn.varying:
        points = data if isinstance(data, list) else [data]
        points = [_check_varying_point(defn, p) for p in points]
        return _pack(defn, points, [p.nbytes for p in points], max_event_bytes,
                     lambda part: {"s": json.dumps([list(p.shape) for p in part]),
                                   "d": b"".join(p.tobytes() for p in part)})
    arr = as_points(defn, data)
    point_nbytes = defn.point_nbytes
    if point_nbytes > max_event_bytes:
        raise EventTooLargeError(
            f"stream {defn.name!r}: one point is {point_nbytes} bytes, over the event limit "
            f"of {max_event_bytes} bytes")
    per_entry = max(1, min(max_event_bytes, ENTRY_TARGET_BYTES) // max(point_nbytes, 1))
    out = []
    for start in range(0, len(arr), per_entry):
        part = arr[start:start + per_entry]
        out.append((len(part), {"d": memoryview(part).cast("B") if part.size else b""}))
    return out


def _pack(defn, items, sizes, max_event_bytes, fields_of) -> list[tuple[int, dict]]:
    out, part, part_bytes = [], [], 0
    target = min(max_event_bytes, ENTRY_TARGET_BYTES)
    for item, size in zip(items, sizes):
        if size > max_event_bytes:
            raise EventTooLargeError(
                f"stream {defn.name!r}: one point is {size} bytes, over the event limit "
                f"of {max_event_bytes} bytes")
        if part and part_bytes + size > target:
            out.append((len(part), fields_of(part)))
            part, part_bytes = [], 0
        part.append(item)
        part_bytes += size
    if part:
        out.append((len(part), fields_of(part)))
    return out


def _check_reference(defn, point) -> dict:
    if not (isinstance(point, dict) and isinstance(point.get("file"), str)
            and isinstance(point.get("dataset"), str) and isinstance(point.get("index"), int)):
        raise ValueError(f"stream {defn.name!r}: a reference point must be "
                         f"{{'file': str, 'dataset': str, 'index': int}}, got {point!r}")
    return point


def decode(defn: StreamDefinition, fields: dict, first: int | None = None):
    """Entry fields -> points: an array (n, *shape), or a list for json/varying streams.

    `first`: index of the entry's first point, for the message of the MalformedEntryError
    raised when the fields do not fit the definition."""
    n = _count(defn, fields, first)
    payload = fields.get(b"d", b"")
    if defn.encoding in ("json", "references"):
        try:
            points = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _malformed(defn, first, n, f"payload is not JSON ({exc})") from None
        if not isinstance(points, list) or len(points) != n:
            got = f"{len(points)} points" if isinstance(points, list) else type(points).__name__
            raise _malformed(defn, first, n, f"payload holds {got}, expected a list of {n}")
        return points
    dt = np.dtype(defn.dtype)
    if defn.encoding == "bslz4":
        from . import bslz4

        out = np.empty((n, *defn.shape), dt)
        for i, chunk in enumerate(raw_chunks(fields, defn, first)):
            try:
                out[i] = bslz4.decompress(chunk, dt, defn.shape)
            except ValueError as exc:
                raise _malformed(defn, first, n, f"chunk {i}: {exc}") from None
        return out
    if defn.varying:
        shapes = _json_field(defn, fields, b"s", first, n)
        if not isinstance(shapes, list) or len(shapes) != n or not all(
                isinstance(s, list) and len(s) == len(defn.shape)
                and all(isinstance(d, int) and d >= 0 for d in s)
                and all(w in (-1, d) for w, d in zip(defn.shape, s)) for s in shapes):
            raise _malformed(defn, first, n, f"point shapes {str(shapes)[:80]} do not fit "
                                             f"{n} points of shape {defn.shape} (-1 = any)")
        counts = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        if sum(counts) * dt.itemsize != len(payload):
            raise _malformed(defn, first, n, f"{len(payload)} bytes of payload, the point "
                                             f"shapes need {sum(counts) * dt.itemsize} "
                                             f"({dt})")
        points, pos = [], 0
        for shape, count in zip(shapes, counts):
            points.append(np.frombuffer(payload, dt, count, pos).reshape(shape))
            pos += count * dt.itemsize
        return points
    if len(payload) != n * defn.point_nbytes:
        raise _malformed(defn, first, n, f"{len(payload)} bytes of payload, expected "
                                         f"{n * defn.point_nbytes} ({n} points of {dt} "
                                         f"{defn.shape}, {defn.point_nbytes} bytes each)")
    return np.frombuffer(payload, dt).reshape((n, *defn.shape))


def raw_chunks(fields: dict, defn: StreamDefinition | None = None,
               first: int | None = None) -> list[bytes]:
    """The compressed chunks of a bslz4 entry, untouched (for the writer): zero-copy
    memoryviews into the entry's payload. With `defn`, each chunk's header is checked
    against the frame size (MalformedEntryError if it does not fit)."""
    payload = memoryview(fields.get(b"d", b""))
    if defn is None:
        sizes = json.loads(fields[b"z"])
    else:
        n = _count(defn, fields, first)
        sizes = _json_field(defn, fields, b"z", first, n)
        if not isinstance(sizes, list) or len(sizes) != n or not all(
                isinstance(z, int) and z >= 0 for z in sizes):
            raise _malformed(defn, first, n, f"chunk sizes {str(sizes)[:80]} are not {n} "
                                             f"byte counts")
        if sum(sizes) != len(payload):
            raise _malformed(defn, first, n, f"{len(payload)} bytes of payload, the chunk "
                                             f"sizes add up to {sum(sizes)}")
    chunks, pos = [], 0
    for size in sizes:
        chunks.append(payload[pos:pos + size])
        pos += size
    if defn is not None:
        from . import bslz4

        for i, chunk in enumerate(chunks):
            try:
                nbytes = bslz4.uncompressed_nbytes(chunk)
            except ValueError as exc:
                raise _malformed(defn, first, len(chunks), f"chunk {i}: {exc}") from None
            if nbytes != defn.point_nbytes:
                raise _malformed(defn, first, len(chunks),
                                 f"chunk {i} holds {nbytes} bytes once decompressed, a frame "
                                 f"of {defn.dtype} {defn.shape} is {defn.point_nbytes}")
    return chunks


def _count(defn, fields, first) -> int:
    try:
        n = int(fields[b"n"])
    except (KeyError, ValueError):
        raise _malformed(defn, first, None, f"field n (number of points) is "
                                            f"{fields.get(b'n')!r}") from None
    if n < 0:
        raise _malformed(defn, first, None, f"field n (number of points) is {n}")
    return n


def _json_field(defn, fields, name: bytes, first, n):
    try:
        return json.loads(fields[name])
    except KeyError:
        raise _malformed(defn, first, n, f"field {name.decode()} is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(defn, first, n, f"field {name.decode()} is not JSON ({exc})") from None


def _malformed(defn, first, n, what: str) -> MalformedEntryError:
    if first is None:
        where = "an entry"
    elif n is None:
        where = f"the entry from point {first}"
    else:
        where = f"points [{first}, {first + n})"
    return MalformedEntryError(f"stream {defn.name!r}: {where}: {what} (the stream is "
                               f"{defn.encoding} {defn.dtype or ''} {defn.shape})")
