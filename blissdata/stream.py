"""A typed, append-only stream of points in Redis, and cursors reading many at once."""

from __future__ import annotations

import json

import numpy as np
import redis

from . import file_backing, keys
from .encoding import StreamDefinition, decode, encode, raw_chunks
from .waiting import Deadline, wait_for
from .exceptions import (EndOfStream, IndexNotYetThereError, IndexWontBeThereError,
                         LeaseLostError, MalformedEntryError, ScanNotFoundError,
                         StreamError,
                         StreamSealedError)

# Raise the durable watermark of a stream, never lower it. KEYS[1] durable hash;
# ARGV: stream name, JSON {"file", "dataset", "points"}. Fenced: with KEYS[2] (the scan's
# lease) and ARGV[3] (a writer's token), only while that lease holds that token.
_MARK_FILE_BACKED = """
if KEYS[2] and redis.call('GET', KEYS[2]) ~= ARGV[3] then
  return redis.error_reply('LEASELOST')
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
local new = cjson.decode(ARGV[2])
if old then
  local prev = cjson.decode(old)
  if prev['points'] >= new['points'] then return prev['points'] end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return new['points']
"""
# The same, run even when Redis is full (script flags, Redis >= 7): the watermark is what
# lets the memory tracker make room, so it must get in then most of all.
_MARK_FILE_BACKED_ALLOW_OOM = "#!lua flags=allow-oom" + _MARK_FILE_BACKED

# A cursor joins the points of consecutive numeric entries up to this size each into
# pieces of about JOIN_BYTES (StreamView.parts): bigger entries are handed over as they are.
JOIN_ENTRY_BYTES = 1 << 16
JOIN_BYTES = 1 << 20


def _entries(reply) -> list:
    """XRANGE entries as (id, {field: value}): redis-py's cluster transactions (MULTI/EXEC
    on a RedisCluster) give them unparsed, fields as a flat list."""
    return [(eid, fields if isinstance(fields, dict) else
             dict(zip(fields[::2], fields[1::2]))) for eid, fields in reply]


def _as_sent(response, **options):
    return response


def unparsed_xread_client(client):
    """A client sharing `client`'s connections whose XREAD replies stay as Redis sent them
    (see `xread_streams`), or `client` itself where that cannot be done (a cluster).
    redis-py makes a dict of each entry's fields: 60 % of a read's cost for small entries
    (64 counters x 1000 entries of 100 points: 1.65 of 2.7 us an entry)."""
    if not isinstance(client, redis.Redis):
        return client
    twin = redis.Redis(connection_pool=client.connection_pool)
    twin.set_response_callback("XREAD", _as_sent)
    return twin


def xread_streams(reply):
    """(stream key, entries) of an XREAD reply: parsed by redis-py, or as Redis sent it
    (RESP3 a map, RESP2 a list of pairs); an entry is (id, fields), fields a dict or a flat
    list of names and values (`entry_fields`)."""
    if not reply:
        return []
    return reply.items() if isinstance(reply, dict) else reply


def entry_fields(fields) -> dict:
    """An entry's fields as a dict, from a parsed reply (a dict) or an unparsed one (a flat
    list of names and values)."""
    return fields if isinstance(fields, dict) else dict(zip(fields[::2], fields[1::2]))


def _payload_and_count(fields) -> tuple:
    """(d, n) of an entry of a fixed-shape numeric stream; (None, None) if it is not one."""
    if isinstance(fields, dict):
        return fields.get(b"d"), fields.get(b"n")
    if len(fields) == 4 and fields[0] == b"d" and fields[2] == b"n":  # as encode() writes
        return fields[1], fields[3]
    return None, None


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


class Stream:
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
        self._send_pipelined({self: data})

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

    def _send_pipelined(self, batches: dict) -> None:
        """One MULTI/EXEC for every entry: all land or none (the scan's keys share a hash
        slot). When Redis is full (maxmemory, the memory tracker waiting for the writer), wait
        and retry up to the store's `full_timeout_s`: the producer slows down, nothing is
        lost or written twice."""
        prepared = [(s, s._prepare_send(d)) for s, d in batches.items()]
        entries = [(stream.key, entry_id, fields) for stream, stream_entries in prepared
                   for entry_id, fields in stream_entries]
        if not entries:
            return
        names = [s.name for s, _ in prepared]
        stream_keys = ([s.key for s, e in prepared if e and not s._created]
                       + [s.key for s, e in prepared if e and s._created])
        new = sum(1 for s, e in prepared if e and not s._created)
        try:
            written = self._store.while_full(
                lambda: guarded_xadds(self._redis, self._scan.key, stream_keys, new, entries),
                f"nothing of this batch of {names} was written")
        except redis.ResponseError as exc:
            if "equal or smaller" in str(exc):
                raise StreamSealedError(
                    f"scan {self._scan.key}: another producer wrote or sealed one of "
                    f"{names}: {exc}") from exc
            raise
        if not written:
            raise ScanNotFoundError(f"scan {self._scan.key} no longer exists (deleted, or "
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
            data = self._read(start, stop)
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
        return self._read(index, index + 1)[0]

    def _empty(self):
        if self.definition.is_array and not self.definition.varying:
            return np.empty((0, *self.shape), self.dtype)
        return []

    def _read(self, start: int, stop: int):
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

    # ---- file backing (published by the writer) ---------------------------------------
    def mark_file_backed(self, file: str, dataset: str, points: int,
                         fence: tuple[str, str] | None = None) -> int:
        """Say that points [0, points) are durable in `file`:`dataset`. Never lowers.

        `fence` = (lease key, token): published only while that lease holds that token,
        atomically; else LeaseLostError and nothing is changed."""
        try:
            return int(self._redis.execute_command(*self._mark_command(file, dataset, points,
                                                                       fence)))
        except redis.ResponseError as exc:
            raise self._lease_lost(exc, repr(self.name)) from None

    def _mark_command(self, file: str, dataset: str, points: int, fence) -> list:
        value = json.dumps({"file": file, "dataset": dataset, "points": int(points)})
        script = (_MARK_FILE_BACKED_ALLOW_OOM if self._store.script_flags()
                  else _MARK_FILE_BACKED)
        script_keys = [keys.durable_key(self._scan.key)]
        args = [self.name, value]
        if fence is not None:
            script_keys.append(fence[0])
            args.append(fence[1])
        # EVAL as a raw command: redis-py's cluster pipelines refuse .eval()
        return ["EVAL", script, len(script_keys), *script_keys, *args]

    def _lease_lost(self, exc: redis.ResponseError, what: str) -> Exception:
        """LeaseLostError for a refused watermark; any other error as it is."""
        if "LEASELOST" not in str(exc):
            return exc
        return LeaseLostError(f"scan {self._scan.key}: watermark of {what} not published, "
                              f"this writer no longer holds the scan's lease")

    @staticmethod
    def mark_file_backed_all(marks: list, fence: tuple[str, str] | None = None) -> None:
        """`mark_file_backed` for streams of one scan in one round trip: `marks` =
        [(stream, file, dataset, points)]. A refused fence raises LeaseLostError; another
        Redis error (a full Redis) the first one; the others may have been published."""
        if not marks:
            return
        first = marks[0][0]
        pipe = first._redis.pipeline(transaction=False)
        for stream, file, dataset, points in marks:
            pipe.execute_command(*stream._mark_command(file, dataset, points, fence))
        try:
            pipe.execute()
        except redis.ResponseError as exc:
            raise first._lease_lost(exc, f"{len(marks)} streams") from None

    @staticmethod
    def lengths(streams: list) -> list[int]:
        """len() of each stream of one scan (points published), in one round trip."""
        if not streams:
            return []
        pipe = streams[0]._redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xrevrange(stream.key, "+", "-", count=1)
        return [Stream._length_of(got[0] if got else None)[0] for got in pipe.execute()]

    @property
    def file_backing(self) -> dict | None:
        """{"file", "dataset", "points"} once the writer marked this stream, else None."""
        raw = self._redis.hget(keys.durable_key(self._scan.key), self.name)
        return json.loads(raw) if raw else None


def concat_points(definition: StreamDefinition, parts: list):
    """Pieces of a stream's points as one: an array, or a list for json/varying streams."""
    if definition.encoding == "references" or (definition.is_array and not definition.varying):
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    return [p for part in parts for p in part]


class StreamView:
    """What a cursor read from one stream: points [index, index + len(view)).

    `data` is all of them in one array (a list for json/varying streams, a list of bytes
    for raw bslz4 chunks); `parts` the same points in pieces, for consumers that can take
    pieces without the copy that joining them costs: one piece per Redis entry, except for
    runs of small entries of fixed-shape numeric points, joined up to ~1 MiB a piece.
    """

    def __init__(self, stream, index: int, parts: list, raw: bool = False,
                 entry_nbytes: int = 0):
        self.index = index
        self.parts = parts
        # payload bytes of the largest Redis entry read (small entries' points come joined
        # in one piece: a part can be much bigger than an entry)
        self.entry_nbytes = entry_nbytes
        self._stream, self._raw, self._data = stream, raw, None
        self._length = sum(len(p) for p in parts)

    @property
    def data(self):
        if self._data is None:
            self._data = ([c for part in self.parts for c in part] if self._raw
                          else concat_points(self._stream.definition, self.parts))
        return self._data

    def __len__(self):
        return self._length

    def __repr__(self):
        return f"<StreamView {self._stream.name!r} [{self.index}:{self.index + len(self)}]>"


class CursorGroup:
    """Read any number of streams with one blocking call.

    ``read()`` returns {stream name: StreamView} with the points that arrived since the
    previous read; ``ended`` is the set of streams that are sealed and fully read.
    A gap (points trimmed from Redis before this reader got them) is filled from the file
    the writer marked, or raises IndexNoMoreThereError naming the range.
    """

    def __init__(self, streams, start: int | dict = 0, raw_chunks: bool = False):
        """`start`: index to read from, for every stream or per stream name (default 0)."""
        self.streams = {s.name: s for s in streams}
        first = next(iter(self.streams.values()), None)
        self._store = first.scan.store if first is not None else None
        self._redis = self._store.redis if first is not None else None
        self._reader = unparsed_xread_client(self._redis) if first is not None else None
        starts = start if isinstance(start, dict) else {}
        self._next = {name: int(starts.get(name, 0 if starts else start))
                      for name in self.streams}
        self._last_id = {name: self._id_before(s, self._next[name])
                         for name, s in self.streams.items()}
        self.ended: set[str] = set()
        # bslz4 streams: give the compressed chunks as they are (list of bytes), for a
        # consumer that stores them without recompressing (the writer).
        self.raw_chunks = raw_chunks
        # an entry that does not fit its stream: raised once the points before it are read
        self._malformed: MalformedEntryError | None = None

    @staticmethod
    def _id_before(stream, start: int) -> str:
        """An id just below the entry holding point `start`, for XREAD to begin there."""
        first = start
        if start > 0:
            got = stream._redis.xrevrange(stream.key, keys.entry_id(start), "-", count=1)
            if got and b"end" not in got[0][1]:
                first = min(start, keys.first_index(got[0][0]))
        return f"{first}-0"

    def position(self, name: str) -> int:
        """Index of the next point this cursor will return for that stream."""
        return self._next[name]

    def read(self, block: bool = True, timeout: float | None = None,
             count: int | None = None) -> dict[str, StreamView]:
        """New points of every open stream; {} after `timeout` seconds (None: wait for
        ever) with nothing new, or at once if not `block`. Also {} when the only news is the
        end of a stream: check `ended`. A lost connection is retried
        (RedisUnreachableError if it stays lost).

        `count` bounds the number of Redis entries read per stream in one call.
        """
        if self._malformed is not None:  # the points before it were handed out last time
            raise self._malformed
        open_streams = {self.streams[n].key: n for n in self.streams if n not in self.ended}
        if not open_streams:
            raise EndOfStream(f"every stream of this cursor is sealed and read: "
                              f"{sorted(self.streams)}")
        if not block:
            return self._read_once(open_streams, count, None) or {}
        views = wait_for(self._store, lambda block_ms: self._read_once(open_streams, count,
                                                                       block_ms),
                         Deadline(timeout), f"reading {sorted(open_streams.values())}")
        return views or {}

    def _read_once(self, open_streams: dict, count: int | None,
                   block_ms: int | None) -> dict[str, StreamView] | None:
        """One XREAD of the open streams: their views ({} if the reply held only ends or
        points already returned), None if nothing came. All or nothing: on an error the
        cursor stays where it was, so the read can be retried."""
        reply = self._reader.xread({k: self._last_id[n] for k, n in open_streams.items()},
                                   count=count, block=block_ms)
        if not reply:
            return None
        before = dict(self._last_id), dict(self._next), set(self.ended)
        try:
            views = {}
            for key, entries in xread_streams(reply):
                name = open_streams[key.decode() if isinstance(key, bytes) else key]
                view = self._consume(name, entries)
                if view is not None:
                    views[name] = view
        except BaseException:  # a gap read from the file or Redis failed: read again
            self._last_id, self._next, self.ended = before
            raise
        if self._malformed is not None and not views:
            raise self._malformed
        return views

    def _is_raw(self, stream) -> bool:
        return self.raw_chunks and stream.encoding == "bslz4"

    def _consume(self, name: str, entries) -> StreamView | None:
        stream = self.streams[name]
        start = self._next[name]
        raw = self._is_raw(stream)
        definition = stream.definition
        # Small entries of fixed-shape numeric points (counters send a few points an entry)
        # are joined: one array per run, not one per entry. Per-entry work was most of a
        # writer's CPU for fast scalars.
        joinable = definition.point_nbytes if definition.encoding == "numeric" else None
        parts, run, run_bytes, largest = [], [], 0, 0
        position, last_id = start, None  # of the run (self._next, self._last_id after it)
        for eid, fields in entries:
            first = int(eid[:eid.index(b"-")])
            if joinable and first == position:
                payload, n = _payload_and_count(fields)
                size = len(payload) if payload is not None else -1
                if 0 <= size <= JOIN_ENTRY_BYTES and n is not None and n.isdigit() \
                        and size == int(n) * joinable:
                    run.append(payload)
                    run_bytes += size
                    if size > largest:
                        largest = size
                    last_id, position = eid, first + size // joinable
                    if run_bytes >= JOIN_BYTES:
                        parts.append(self._joined(definition, run))
                        run, run_bytes = [], 0
                    continue
            if run:
                parts.append(self._joined(definition, run))
                run, run_bytes = [], 0
            if last_id is not None:
                self._last_id[name], self._next[name], last_id = last_id, position, None
            fields = entry_fields(fields)
            largest = max(largest, len(fields.get(b"d", b"")))
            if first > self._next[name]:  # trimmed from Redis before this reader got it
                gap = stream._read(self._next[name], first)
                if raw:
                    from . import bslz4
                    gap = [bslz4.compress(point) for point in gap]
                parts.append(gap)
                self._next[name] = first
            position = self._next[name]
            if b"end" in fields:
                self._last_id[name] = eid
                self.ended.add(name)
                continue
            skip = self._next[name] - first  # the cursor started inside this entry
            n = fields.get(b"n", b"")
            if n.isdigit() and skip >= int(n):
                self._last_id[name] = eid
                continue
            try:
                if raw:
                    points = raw_chunks(fields, definition, first)
                else:
                    points = decode(definition, fields, first)
            except MalformedEntryError as exc:
                self._malformed = exc
                break
            self._last_id[name] = eid
            parts.append(points[skip:])
            self._next[name] = first + len(points)
            position = self._next[name]
        if run:
            parts.append(self._joined(definition, run))
        if last_id is not None:
            self._last_id[name], self._next[name] = last_id, position
        if self._next[name] == start:
            return None
        return StreamView(stream, start, parts, raw=raw, entry_nbytes=largest)

    @staticmethod
    def _joined(definition: StreamDefinition, payloads: list) -> np.ndarray:
        """The points of consecutive entries (payloads checked) in one array."""
        data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        return np.frombuffer(data, definition.dtype).reshape((-1, *definition.shape))
