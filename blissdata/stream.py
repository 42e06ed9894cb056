"""A typed, append-only stream of points in Redis: `Stream` (send, seal, index and slice),
and the guarded MULTI/EXEC every send goes through (`guarded_xadds`). Reading many streams at
once: blissdata.cursor; the durable watermark the writer publishes: blissdata.watermark."""

from __future__ import annotations

import json

import numpy as np
import redis

from . import file_backing, keys
from .cursor import CursorGroup, concat_points
from .encoding import StreamDefinition, decode, encode
from .exceptions import (IndexNotYetThereError, IndexWontBeThereError, ScanNotFoundError,
                         StreamError,
                         StreamSealedError)
from .watermark import FileBackedMarks


def _entries(reply) -> list:
    """XRANGE entries as (id, {field: value}): redis-py's cluster transactions (MULTI/EXEC
    on a RedisCluster) give them unparsed, fields as a flat list."""
    return [(eid, fields if isinstance(fields, dict) else
             dict(zip(fields[::2], fields[1::2]))) for eid, fields in reply]


# First command of every send's MULTI/EXEC: the scan must still exist. KEYS[1] scan hash, then
# the data streams the transaction adds to, the first ARGV[1] of them possibly not created yet.
# The XADDs that follow carry NOMKSTREAM, so:
# - scan gone: its left-over stream keys (orphans) are deleted and every XADD writes nothing;
# - scan there: streams not created yet are created empty (a consumer group made and
#   dropped: no entry, last id 0-0), so the XADDs write as usual.
# A runtime error cannot abort a MULTI/EXEC, hence this shape. Returns 1, or 0 if gone.
_GUARD_SEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
  return 0
end
for i = 2, 1 + tonumber(ARGV[1]) do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[i], 'blissdata:new', '$', 'MKSTREAM')
    redis.call('XGROUP', 'DESTROY', KEYS[i], 'blissdata:new')
  end
end
return 1
"""


def guarded_xadds(redis_client, scan_key: str, stream_keys: list, new: int, entries) -> bool:
    """XADD `entries` ((stream key, entry id, fields), ...) in one MULTI/EXEC, only if the
    scan still exists; False (and nothing written) if it does not. `stream_keys`: every key
    of `entries` once, the first `new` of them possibly not created yet. Redis errors
    propagate."""
    pipe = redis_client.pipeline(transaction=True)
    # EVAL as a raw command: redis-py's cluster pipelines refuse .eval(), not the command
    pipe.execute_command("EVAL", _GUARD_SEND, 1 + len(stream_keys), scan_key, *stream_keys, new)
    for key, entry_id, fields in entries:
        pipe.xadd(key, fields, id=entry_id, nomkstream=True)
    exists, *ids = pipe.execute()
    if not exists:
        return False
    if None in ids:  # removed by hand while its scan exists: say so rather than lose points
        vanished = sorted({key for (key, _, _), eid in zip(entries, ids) if eid is None})
        raise StreamError(f"scan {scan_key}: stream keys {vanished} were removed from Redis "
                          f"while the scan exists; points sent to them were not written")
    return True


class Stream(FileBackedMarks):
    """One stream of a scan. Producers `send()` and `seal()`; readers index and slice.

    Indexing follows numpy/h5py: ``stream[i]`` one point, ``stream[a:b]`` an array of
    points (a list for json streams and streams whose point shape varies).
    """

    def __init__(self, scan, definition: StreamDefinition):
        self._scan = scan
        self.definition = definition
        self.key = keys.data_key(scan.key, definition.name)
        self._next_index = 0  # producer side
        self._sealed_here = False
        self._created = False  # producer side: its Redis key exists (written to once)

    # ---- description -----------------------------------------------------------------
    name = property(lambda self: self.definition.name)
    encoding = property(lambda self: self.definition.encoding)
    shape = property(lambda self: self.definition.shape)
    info = property(lambda self: self.definition.info)

    @property
    def dtype(self):
        return np.dtype(self.definition.dtype) if self.definition.dtype else None

    @property
    def scan(self):
        """The scan this stream belongs to."""
        return self._scan

    @property
    def _store(self):
        return self._scan.store

    @property
    def _redis(self) -> redis.Redis:
        return self._store.redis

    def __repr__(self):
        return f"<Stream {self.name!r} {self.encoding} {self.definition.dtype} {self.shape}>"

    # ---- producer --------------------------------------------------------------------
    def send(self, data) -> None:
        """Publish one point or a batch (first axis = points). Nothing is written on error."""
        self.send_all({self: data})

    def send_chunks(self, chunks) -> None:
        """Publish frames already compressed in the HDF5 bslz4 chunk format (bslz4 streams)."""
        if self.encoding != "bslz4":
            raise StreamError(f"stream {self.name!r}: send_chunks() needs a bslz4 stream, "
                              f"this one is {self.encoding}")
        self.send(chunks)

    def _prepare_send(self, data) -> list[tuple[str, dict]]:
        """Encode and check `data`; returns (entry id, fields) to XADD. Raises on bad input."""
        if self._sealed_here:
            raise StreamSealedError(f"stream {self.name!r} of scan {self._scan.key} is sealed")
        self._scan.check_can_send(self)
        if self.encoding == "bslz4" and not isinstance(data, (bytes, bytearray, memoryview, list, tuple)):
            from . import bslz4

            arrays = np.asarray(data, dtype=self.dtype)
            if arrays.shape == self.shape:
                arrays = arrays[np.newaxis]
            if arrays.shape[1:] != self.shape:
                raise ValueError(f"stream {self.name!r}: expected point shape {self.shape}, "
                                 f"got {arrays.shape[1:]}")
            data = [bslz4.compress(a) for a in arrays]
        elif self.encoding == "bslz4":
            data = self._check_chunks(data)
        entries, index = [], self._next_index
        for count, fields in encode(self.definition, data, self._store.max_event_bytes):
            fields["n"] = count
            entries.append((keys.entry_id(index), fields))
            index += count
        return entries

    def _check_chunks(self, chunks):
        from . import bslz4

        chunks = [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else list(chunks)
        for i, chunk in enumerate(chunks):
            try:
                size = bslz4.uncompressed_nbytes(chunk)
            except ValueError as exc:
                raise ValueError(f"stream {self.name!r}: chunk {i}: {exc}") from None
            if size != self.definition.point_nbytes:
                raise ValueError(
                    f"stream {self.name!r}: chunk {i} holds {size} bytes once decompressed, "
                    f"expected {self.definition.point_nbytes} ({self.definition.dtype} "
                    f"{self.shape})")
        return chunks

    @staticmethod
    def send_all(batches: dict) -> None:
        """`send` to streams of one scan ({stream: data}) in one MULTI/EXEC for every entry:
        all land or none (the scan's keys share a hash slot). When Redis is full (maxmemory,
        the memory tracker waiting for the writer), wait and retry up to the store's
        `full_timeout_s`: the producer slows down, nothing is lost or written twice."""
        prepared = [(s, s._prepare_send(d)) for s, d in batches.items()]
        entries = [(stream.key, entry_id, fields) for stream, stream_entries in prepared
                   for entry_id, fields in stream_entries]
        if not entries:
            return
        names = [s.name for s, _ in prepared]
        stream_keys = ([s.key for s, e in prepared if e and not s._created]
                       + [s.key for s, e in prepared if e and s._created])
        new = sum(1 for s, e in prepared if e and not s._created)
        first = next(iter(batches))
        try:
            written = first._store.while_full(
                lambda: guarded_xadds(first._redis, first._scan.key, stream_keys, new, entries),
                f"nothing of this batch of {names} was written")
        except redis.ResponseError as exc:
            if "equal or smaller" in str(exc):
                raise StreamSealedError(
                    f"scan {first._scan.key}: another producer wrote or sealed one of "
                    f"{names}: {exc}") from exc
            raise
        if not written:
            raise ScanNotFoundError(f"scan {first._scan.key} no longer exists (deleted, or "
                                    f"expired by the memory tracker): nothing of this batch "
                                    f"of {names} was written")
        for stream, entries in prepared:
            stream._created = True
            stream._next_index += sum(int(f["n"]) for _, f in entries)

    def seal(self) -> int:
        """End the stream; returns its number of points. A second seal is an error."""
        if self._sealed_here:
            raise StreamSealedError(f"stream {self.name!r} of scan {self._scan.key} "
                                    f"is already sealed")
        seal = [(self.key, keys.entry_id(self._next_index), {"end": self._next_index})]
        try:
            written = self._store.while_full(
                lambda: guarded_xadds(self._redis, self._scan.key, [self.key],
                                      0 if self._created else 1, seal),
                f"stream {self.name!r} was not sealed")
        except redis.ResponseError as exc:
            raise StreamSealedError(f"stream {self.name!r} of scan {self._scan.key} "
                                    f"could not be sealed (sealed elsewhere?): {exc}") from exc
        if not written:
            raise ScanNotFoundError(f"scan {self._scan.key} no longer exists (deleted, or "
                                    f"expired by the memory tracker): stream {self.name!r} "
                                    f"was not sealed")
        self._sealed_here = True
        return self._next_index

    def seal_if_open(self) -> None:
        """Seal the stream unless it is sealed already (here or by another producer)."""
        if not self._sealed_here and not self.sealed:
            self.seal()

    def seal_after_last_point(self) -> int:
        """Seal a stream whose producer is gone (``Scan.end_abandoned``), after the points
        it holds; returns its number of points (a stream already sealed is left as it is)."""
        length, sealed = self._length_and_sealed()
        if not sealed:
            self._next_index = length
            self.seal()
        return length

    # ---- reader ----------------------------------------------------------------------
    def _last_entry(self):
        got = self._redis.xrevrange(self.key, "+", "-", count=1)
        return got[0] if got else None

    def _length_and_sealed(self) -> tuple[int, bool]:
        return self._length_of(self._last_entry())

    @staticmethod
    def _length_of(entry) -> tuple[int, bool]:
        """(points, sealed) from the stream's last entry (None: no entry yet)."""
        if entry is None:
            return 0, False
        eid, fields = entry
        if b"end" in fields:
            return int(fields[b"end"]), True
        return keys.first_index(eid) + int(fields[b"n"]), False

    def __len__(self) -> int:
        return self._length_and_sealed()[0]

    @property
    def sealed(self) -> bool:
        return self._length_and_sealed()[1]

    def __iter__(self):
        """Iterate over points published so far, then wait for new ones until the seal."""
        cursor = CursorGroup([self])
        while True:
            views = cursor.read(block=True, timeout=None)
            for view in views.values():
                yield from view.data
            if cursor.ended:
                return

    def __getitem__(self, item):
        if isinstance(item, slice):
            length, sealed = self._length_and_sealed()
            start, stop, step = item.indices(length)
            if step < 1:
                raise ValueError(f"stream {self.name!r}: step must be >= 1 (got {step}), "
                                 f"as in h5py")
            if start >= stop:
                return self._empty()
            data = self.read_points(start, stop)
            return data if step == 1 else data[::step]
        index = int(item)
        length, sealed = self._length_and_sealed()
        if index < 0:
            index += length
            if index < 0:
                raise IndexError(f"stream {self.name!r}: index {item} out of range "
                                 f"({length} points)")
        if index >= length:
            if sealed:
                raise IndexWontBeThereError(
                    f"stream {self.name!r}: index {index} will never exist, the stream was "
                    f"sealed at {length} points")
            raise IndexNotYetThereError(
                f"stream {self.name!r}: index {index} is not published yet "
                f"({length} points so far)")
        return self.read_points(index, index + 1)[0]

    def _empty(self):
        if self.definition.is_array and not self.definition.varying:
            return np.empty((0, *self.shape), self.dtype)
        return []

    def read_points(self, start: int, stop: int):
        """Points [start, stop) from Redis, and from the file for what Redis no longer has."""
        # MULTI/EXEC: one snapshot, so a trim between the commands cannot leave a hole
        # (the scan's keys share a hash slot, so this holds on a cluster too).
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrevrange(self.key, keys.entry_id(start), "-", count=1)
        pipe.xrange(self.key, "(" + keys.entry_id(start), keys.entry_id(stop - 1))
        pipe.hget(keys.durable_key(self._scan.key), self.name)
        pipe.hget(keys.lost_key(self._scan.key), self.name)
        before, after, backing, lost = pipe.execute()
        entries = [e for e in _entries(before + after) if b"end" not in e[1]]
        parts, have_from = [], None
        with self._scan.store.files.in_use():  # files opened for this read only
            for eid, fields in entries:
                first = keys.first_index(eid)
                n = int(fields[b"n"])
                if first + n <= start:
                    continue
                if have_from is None:
                    have_from = first
                lo, hi = max(start, first) - first, min(stop, first + n) - first
                points = decode(self.definition, fields, first)[lo:hi]
                if self.encoding == "references":
                    points = file_backing.reference_frames(self, points)
                parts.append(points)
            first_in_redis = stop if have_from is None else max(have_from, start)
            if first_in_redis > start:  # trimmed from Redis: the file the writer marked
                parts.insert(0, file_backing.read_points(
                    self, start, first_in_redis, json.loads(backing) if backing else None,
                    file_backing.lost_ranges(lost)))
        return self._concat(parts)

    def _concat(self, parts):
        return concat_points(self.definition, parts)

    @staticmethod
    def lengths(streams: list) -> list[int]:
        """len() of each stream of one scan (points published), in one round trip."""
        if not streams:
            return []
        pipe = streams[0]._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xrevrange(stream.key, "+", "-", count=1)
        return [Stream._length_of(got[0] if got else None)[0] for got in pipe.execute()]
