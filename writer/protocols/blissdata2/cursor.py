"""Reading many streams of a blissdata 2 scan with one blocking XREAD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from blissdata.cursor import entry_fields, unparsed_xread_client, xread_streams

from .lima import LimaSavingOff
from .protocol import Bliss2Error, SEAL_BYTES, SEAL_ENTRY

if TYPE_CHECKING:
    from .scan import Bliss2Stream


JOIN_BYTES = 1 << 20  # small points read together are appended as one array
JOIN_ENTRY_BYTES = 1 << 16  # ... from entries up to this size (bigger: as they are)


@dataclass
class View:
    """Points read from one stream: `index` of the first, `parts` one piece per entry."""
    index: int
    parts: list
    entry_nbytes: int = 0  # payload bytes of the largest Redis entry read

    def __len__(self):
        return sum(len(p) for p in self.parts)


def _batch(fields) -> tuple:
    """(payload or None, number of points, fields) of an entry; a batch as blissdata 2
    writes it ([b"payload", data, b"len", n] unparsed) read without making a dict."""
    if isinstance(fields, list) and len(fields) == 4 and fields[0] == b"payload" \
            and fields[2] == b"len":
        return fields[1], int(fields[3]), fields
    fields = entry_fields(fields)
    return fields.get(b"payload"), int(fields.get(b"len", 1)), fields


class Cursor:
    """Reads many streams of a scan with one blocking XREAD; `ended` = sealed and read."""

    def __init__(self, streams: list[Bliss2Stream], start: dict[str, int]):
        self.streams = {s.name: s for s in streams}
        self.client = streams[0].scan.client if streams else None
        self._reader = unparsed_xread_client(self.client) if streams else None
        self.ended: set[str] = set()
        self._next = {s.name: int(start.get(s.name, 0)) for s in streams}
        self._since = {}
        for s in streams:
            self._since[s.name] = self._entry_holding(s, self._next[s.name])

    def _entry_holding(self, stream: Bliss2Stream, index: int) -> str:
        """XREAD position just before the entry that holds point `index`."""
        if stream.lima is not None:  # statuses: the newest is all that counts
            last = [e for e, _ in self.client.xrevrange(stream.key, count=2)
                    if e.decode() != SEAL_ENTRY]
            return f"{int(last[0].split(b'-')[0])}-0" if last else "0-0"
        if index <= 0:
            return "0-0"
        found = self.client.xrevrange(stream.key, max=f"{index}-1", count=1)
        if not found:
            return "0-0"
        return f"{int(found[0][0].split(b'-')[0])}-0"

    def read(self, block: bool = True, timeout: float | None = None, count: int = 64):
        open_streams = {self.streams[n].key: n for n in self.streams if n not in self.ended}
        if not open_streams:
            return {}
        block_ms = None if not block else (0 if timeout is None else max(1, int(timeout * 1e3)))
        reply = self._reader.xread({k: self._since[n] for k, n in open_streams.items()},
                                   count=count, block=block_ms)
        views = {}
        for key, entries in xread_streams(reply):
            name = open_streams[key.decode() if isinstance(key, bytes) else key]
            view = self._consume(name, entries)
            if view is not None:
                views[name] = view
        return views

    def _consume_lima(self, name: str, entries) -> View | None:
        """Statuses -> the references of the frames acquired since the last read."""
        stream = self.streams[name]
        self._since[name] = entries[-1][0].decode()
        if self._since[name] == SEAL_ENTRY:
            self.ended.add(name)
        frames = stream.lima_status(entries)
        start = self._next[name]
        if frames <= start:
            return None
        if not stream.lima.saved:
            raise LimaSavingOff(f"stream {name!r}: lima saving is off, no file holds its "
                                "frames")
        self._next[name] = frames
        return View(start, [[stream.lima.reference(i, stream.saving_dir)
                             for i in range(start, frames)]])

    def _consume(self, name: str, entries) -> View | None:
        stream = self.streams[name]
        if stream.lima is not None:
            return self._consume_lima(name, [(entry_id, entry_fields(fields))
                                             for entry_id, fields in entries])
        start = self._next[name]
        # the payloads of small fixed-shape numeric points (one point an entry, as
        # blissdata 2 sends counters) are joined, not decoded one by one
        try:
            joinable = stream.definition.point_nbytes \
                if stream.definition.encoding == "numeric" else None
        except Bliss2Error:  # said when a point has to be decoded
            joinable = None
        parts, largest, run, run_bytes = [], 0, [], 0
        position, since = start, None  # self._next[name], self._since[name] once done
        try:
            for entry_id, fields in entries:
                payload, count, fields = _batch(fields)
                if entry_id == SEAL_BYTES:
                    since = entry_id
                    total = int(fields[b"id"])
                    if total != position:
                        raise Bliss2Error(f"stream {name!r}: sealed at {total} points, "
                                          f"{position} read")
                    self.ended.add(name)
                    break
                since = entry_id
                first = int(entry_id[:entry_id.index(b"-")])
                if first > position:
                    raise Bliss2Error(f"stream {name!r}: points {position} to {first - 1} "
                                      f"are no longer in Redis (trimmed before being written)")
                skip = position - first
                if skip >= count:
                    continue
                size = len(payload) if payload is not None else 0
                if size > largest:
                    largest = size
                if joinable and not skip and size == count * joinable \
                        and size <= JOIN_ENTRY_BYTES:
                    run.append(payload)
                    run_bytes += size
                    position = first + count
                    if run_bytes >= JOIN_BYTES:
                        parts.append(self._joined(stream, run))
                        run, run_bytes = [], 0
                    continue
                if run:
                    parts.append(self._joined(stream, run))
                    run, run_bytes = [], 0
                try:
                    if payload is None:
                        raise KeyError(b"payload")
                    points = stream.decode(payload, count)
                except (ValueError, KeyError) as exc:
                    raise Bliss2Error(f"stream {name!r}: entry {entry_id.decode()} cannot be "
                                      f"decoded: {exc}") from None
                parts.append(points[skip:] if skip else points)
                position = first + count
        finally:
            self._next[name] = position
            if since is not None:
                self._since[name] = since.decode()
        if run:
            parts.append(self._joined(stream, run))
        if not parts:
            return None
        return View(start, parts, largest)

    @staticmethod
    def _joined(stream: Bliss2Stream, payloads: list) -> np.ndarray:
        """The points of consecutive entries (payload sizes checked) in one array."""
        data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        return np.frombuffer(data, stream.definition.dtype).reshape(
            (-1, *stream.definition.shape))
