"""Reading many streams at once: `CursorGroup` (one blocking XREAD for any number of
streams, gaps trimmed from Redis filled from the file), the `StreamView` it hands out, and the
XREAD helpers the writer's own cursor shares."""

from __future__ import annotations

import numpy as np
import redis

from . import keys
from .encoding import StreamDefinition, decode, raw_chunks
from .waiting import Deadline, wait_for
from .exceptions import EndOfStream, MalformedEntryError

# A cursor joins the points of consecutive numeric entries up to this size each into
# pieces of about JOIN_BYTES (StreamView.parts): bigger entries are handed over as they are.
JOIN_ENTRY_BYTES = 1 << 16
JOIN_BYTES = 1 << 20


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
            got = stream.scan.store.redis.xrevrange(stream.key, keys.entry_id(start), "-",
                                                    count=1)
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
                gap = stream.read_points(self._next[name], first)
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
