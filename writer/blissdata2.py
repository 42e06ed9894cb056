"""Follow and write scans published by ESRF's blissdata 2.x (what BLISS uses), as
blisswriter 3.0.0 writes them: the file(s) and tree named in ``scan.info["h5maps"]``.

Read from the source of PyPI ``blissdata==2.4.5`` (redis_engine/store.py, scan.py,
streams/event_stream.py, streams/encoding/{numeric,json}.py, h5map/{data_items,hdf5_items}.py)
and ``blisswriter==3.0.0`` (scan_writer.py, stream_writers.py, json_h5_utils.py). Both share
the import name ``blissdata`` with this project, so this module speaks the protocol with
redis-py directly and never imports them.

The protocol (blissdata 2.4.5, ``_PROTOCOL_VERSION_`` = 1; needs RedisJSON + RediSearch):

- ``_SCAN_HISTORY_``: a stream, one entry ``{key: <scan key>}`` per created scan.
- ``<prefix>:scan:<pk>`` (prefix ``esrf``): a RedisJSON document ``{pk, id: {name, number,
  data_policy, session, proposal, collection, dataset, path}, info, state_stream: {pk},
  data_streams: {name: {pk, encoding, info}}}``. A key whose TTL is 0-10 s is deleted.
- ``<prefix>:stream:<pk>``: Redis streams. The state stream's entries are ``{state: 0..4}``
  (CREATED, PREPARED, STARTED, STOPPED, CLOSED). A data stream's entry ``<first index>-1``
  holds ``payload`` (and ``len`` when it has more than one point); the seal is the entry
  ``2**64-1 - 2**64-1`` with ``{id: <total points>}``.
- encodings: ``{"type": "numeric", "dtype_str": "<f8", "shape": [...]}`` (payload = the C
  order bytes of ``len`` points; with a -1 in shape, msgpack ``[point shape, bytes]``), and
  ``{"type": "json"}`` (one JSON value per entry).
- ``info["h5maps"]``: ``{absolute file path: h5map Group}``; info may change only at
  PREPARED and at CLOSED (blissdata asserts it), so the final h5maps is applied at the end.

Lima streams (plugin ``lima``, read from blissdata/streams/lima and lima/client.py; written
as blisswriter's stream_writers.LimaStreamWriter): a virtual dataset onto the detector's
HDF5 files (writer/references.py); lima2 streams (blissdata_lima2 2.0.2, Lima2StreamWriter):
an external link to the detector's master file, at the end. A scan without ``path`` or
``h5maps`` is skipped (as blisswriter 3.0.0 does). What this version cannot write (another
encoding, a plugin other than lima, lima2 and hdf5_fallback, lima files other than HDF5, a
virtual dataset node, an unknown node or data item type, streams in another file than the
scan's own) fails the scan with a reason naming it.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import re
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import h5py
import numpy as np
import redis

from blissdata import ScanNotFoundError, ScanState
from blissdata.exceptions import LeaseLostError
from blissdata.encoding import StreamDefinition
from blissdata.stream import entry_fields, unparsed_xread_client, xread_streams

from . import status as writer_status
from .nexus_skeleton import stream_dataset_parent
from .dataset_writer import DatasetAppender
from .paths import check_link_target, resolve_scan_file
from .pool import UNFINISHED_BLISS2
from .scan_writer import ScanFailed, ScanWriter
from .text_appender import TextAppender

log = logging.getLogger("blisswriter")

BLISSDATA_VERSION = "2.4.5"  # the version this module was read from
PROTOCOL_KEY = "_PROTOCOL_VERSION_"
PROTOCOL_VERSION = 1
SCAN_HISTORY = "_SCAN_HISTORY_"
SEAL_ID = 2**64 - 1
SEAL_ENTRY = f"{SEAL_ID}-{SEAL_ID}"
SEAL_BYTES = SEAL_ENTRY.encode()
DELETED_TTL_S = 10  # blissdata deletes a scan by giving its keys a TTL of 10 s
DURABLE_TTL_S = 7 * 24 * 3600
JOIN_BYTES = 1 << 20  # small points read together are appended as one array
JOIN_ENTRY_BYTES = 1 << 16  # ... from entries up to this size (bigger: as they are)


_MARK_DURABLE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('LEASELOST') end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Bliss2Error(ScanFailed):
    """This blissdata 2 scan cannot be written as published; the message says why."""


def durable_key(scan_key: str) -> str:
    """This writer's watermarks (its own key: blissdata 2 has none for them)."""
    return f"blisswriter:bliss2:{scan_key}:durable"


def is_bliss2_redis(client: redis.Redis) -> bool:
    return client.get(PROTOCOL_KEY) is not None


class ModulesMissing(RuntimeError):
    """The Redis server lacks a module blissdata 2 needs: no blissdata 2 scan can come."""


# module -> a command of it that answers without a key or an index to exist
NEEDED_MODULES = {"RedisJSON": ("JSON.GET", "blisswriter:module-check"),
                  "RediSearch": ("FT._LIST",)}


def check_modules(client: redis.Redis, url_shown: str) -> None:
    """ModulesMissing naming each module blissdata 2 needs (RedisJSON: its scans are JSON
    documents; RediSearch: its producers index them) that the server at `url_shown` has not
    loaded or does not let this client use. Each is tried by a command of its own: Redis
    Stack and Valkey name their modules differently in MODULE LIST."""
    problems = []
    for module, command in NEEDED_MODULES.items():
        try:
            client.execute_command(*command)
        except redis.ResponseError as exc:
            problems.append(f"{module} ({command[0]}: {exc})")
    if problems:
        raise ModulesMissing(
            f"Redis at {url_shown} cannot serve blissdata 2 scans: missing "
            f"{', '.join(problems)}. Run the Redis that BLISS uses (redis-stack-server, or "
            f"valkey-server --loadmodule for valkey-json and valkey-search), or leave "
            f"blissdata2 out of --protocol (config: protocols)")


# ---- msgpack, the little that blissdata 2 uses: [shape list, bytes] ---------------------
def _unpack(buf: bytes, pos: int = 0):
    """Decode one msgpack value at `pos`: (value, next pos). Arrays, ints, bin, str."""
    b = buf[pos]
    if b <= 0x7F:
        return b, pos + 1
    if b >= 0xE0:
        return b - 0x100, pos + 1
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        if b <= 0x9F:
            n, pos = b & 0x0F, pos + 1
        else:
            size = 2 if b == 0xDC else 4
            n, pos = int.from_bytes(buf[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        items = []
        for _ in range(n):
            item, pos = _unpack(buf, pos)
            items.append(item)
        return items, pos
    ints = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if b in ints:
        fmt = ints[b]
        return struct.unpack_from(fmt, buf, pos + 1)[0], pos + 1 + struct.calcsize(fmt)
    lengths = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
    if b in lengths or 0xA0 <= b <= 0xBF:
        if 0xA0 <= b <= 0xBF:
            n, pos = b & 0x1F, pos + 1
        else:
            size = lengths[b]
            n, pos = int.from_bytes(buf[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        raw = buf[pos:pos + n]
        return (raw.decode() if b not in (0xC4, 0xC5, 0xC6) else raw), pos + n
    raise ValueError(f"msgpack byte 0x{b:02x} is not one blissdata {BLISSDATA_VERSION} writes")


# ---- streams --------------------------------------------------------------------------
def _definition(name: str, model: dict) -> StreamDefinition:
    """The native definition of a blissdata 2 stream; Bliss2Error for what we cannot read."""
    encoding = model.get("encoding") or {}
    info = model.get("info") or {}
    if not isinstance(info, dict):
        info = {}
    kind = encoding.get("type") if isinstance(encoding, dict) else None
    plugin = info.get("plugin") or {"lima_v1": "lima", "lima_v2": "lima2",
                                    "subscan": "scan_sequence"}.get(info.get("format", ""))
    if plugin == "lima":
        return LimaFiles.from_info(name, info).definition
    if plugin == "lima2":
        return lima2_definition(name, info)
    if plugin not in (None, "hdf5_fallback"):
        raise Bliss2Error(f"stream {name!r}: blissdata plugin {plugin!r} (scan_sequence: "
                          "subscans) is not written by this writer version")
    if kind == "numeric":
        try:
            dtype = np.dtype(encoding["dtype_str"])
            shape = tuple(int(d) for d in encoding.get("shape") or ())
        except (KeyError, TypeError, ValueError) as exc:
            raise Bliss2Error(f"stream {name!r}: numeric encoding {encoding} unreadable: "
                              f"{exc}") from None
        if dtype.kind not in "biufc":
            raise Bliss2Error(f"stream {name!r}: dtype {dtype} is not numeric")
        return StreamDefinition(name=name, encoding="numeric", dtype=dtype.str, shape=shape,
                                info=info)
    if kind == "json":
        return StreamDefinition(name=name, encoding="json", info=info)
    raise Bliss2Error(f"stream {name!r}: encoding {encoding!r} is not one blissdata "
                      f"{BLISSDATA_VERSION} defines (numeric, json)")


class LimaSavingOff(Bliss2Error):
    """A lima stream whose frames are not saved: blisswriter 3.0.0 writes no dataset."""


@dataclass
class LimaFiles:
    """Where a lima (lima_v1) stream's frames are: blissdata 2.4.5's lima/client.py.

    The stream's events are statuses ``{"last_index", "last_index_saved"}``: frames
    0..last_index exist; frame ``i`` is in file ``file_path % number`` at ``data_path``,
    index ``frame_in_file``, files numbered from ``file_offset``, ``frame_per_file`` frames
    each, restarting with every acquisition of ``frame_per_acquisition`` frames."""
    name: str
    definition: StreamDefinition
    file_path: str | None = None
    data_path: str | None = None
    file_format: str | None = None
    file_offset: int = 0
    frames_per_file: int = 0
    frames_per_acquisition: int = 0

    @classmethod
    def from_info(cls, name: str, info: dict) -> "LimaFiles":
        lima = info.get("lima_info")
        try:
            if lima.get("protocol_version") != 1:
                raise Bliss2Error(f"stream {name!r}: lima protocol version "
                                  f"{lima.get('protocol_version')!r}, this writer reads 1")
            dtype = np.dtype(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            files = cls(name, StreamDefinition(name=name, encoding="references",
                                               dtype=dtype.str, shape=shape, info=info),
                        frames_per_acquisition=int(lima["frame_per_acquisition"]))
            if "file_path" in lima:
                files.file_path, files.data_path = str(lima["file_path"]), lima["data_path"]
                files.file_format = str(lima["file_format"])
                files.file_offset = int(lima["file_offset"])
                files.frames_per_file = int(lima["frame_per_file"])
        except Bliss2Error:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise Bliss2Error(f"stream {name!r}: lima stream info unreadable "
                              f"({type(exc).__name__}: {exc}): {json.dumps(info)[:200]}") from None
        if dtype.kind not in "biufc" or not shape or any(d < 1 for d in shape):
            raise Bliss2Error(f"stream {name!r}: lima frames of dtype {dtype} and shape "
                              f"{shape} are not written by this writer version")
        if files.file_path is not None and not files.file_format.upper().startswith("HDF5"):
            raise Bliss2Error(f"stream {name!r}: lima saves its frames as "
                              f"{files.file_format}; only HDF5 files can be referenced "
                              "(blisswriter 3.0.0 writes a virtual dataset onto them that "
                              "cannot be read)")
        return files

    @property
    def saved(self) -> bool:
        return self.file_path is not None

    def reference(self, frame: int, saving_dir: str | None) -> dict:
        """The frame's file (relative to the scan file's folder when it is below it, as
        blisswriter 3.0.0 writes it), dataset and index in that dataset."""
        acquisition, in_acquisition = divmod(frame, self.frames_per_acquisition) \
            if self.frames_per_acquisition else (0, frame)
        in_file_number, in_file = divmod(in_acquisition, self.frames_per_file) \
            if self.frames_per_file else (0, in_acquisition)
        files_per_acquisition = -(-self.frames_per_acquisition // self.frames_per_file) \
            if self.frames_per_file else 1
        number = acquisition * files_per_acquisition + in_file_number + self.file_offset
        path = self.file_path % number
        if saving_dir is not None:
            try:
                path = str(PurePosixPath(path).relative_to(saving_dir))
            except ValueError:
                pass
        return {"file": path, "dataset": self.data_path, "index": in_file}


LIMA2_PROTOCOL_VERSION = 2  # blissdata_lima2 2.0.2 (Lima2Stream.PROTOCOL_VERSION)


def lima2_definition(name: str, info: dict) -> StreamDefinition:
    """A Lima2 stream (plugin ``lima2``): its events are uint32 counts of the frames the
    detector holds; the frames are in its own files, behind ``info["master_file"]``
    ``[file, dataset]`` (blisswriter 3.0.0 links to it: Lima2StreamWriter)."""
    if info.get("protocol_version") != LIMA2_PROTOCOL_VERSION:
        raise Bliss2Error(f"stream {name!r}: lima2 protocol version "
                          f"{info.get('protocol_version')!r}, this writer reads "
                          f"{LIMA2_PROTOCOL_VERSION}")
    master = info.get("master_file")
    if master is None:
        raise Bliss2Error(f"stream {name!r}: lima2 stream without a master file, its frames "
                          "are in no file (blisswriter 3.0.0 cannot save it either)")
    if not (isinstance(master, (list, tuple)) and len(master) == 2
            and all(isinstance(m, str) and m for m in master)):
        raise Bliss2Error(f"stream {name!r}: lima2 master_file {master!r} is not "
                          "[file, dataset]")
    return StreamDefinition(name=name, encoding="numeric", dtype="<u4", shape=(), info=info)


class Bliss2Stream:
    """One data stream of a blissdata 2 scan, with the surface the scan writer uses."""

    def __init__(self, scan: "Bliss2Scan", name: str, key: str, model: dict):
        self.scan, self.name, self.key, self.model = scan, name, key, model
        self._definition: StreamDefinition | None = None
        self._error: str | None = None
        self.lima: LimaFiles | None = None  # a lima stream: its events are statuses
        self.lima2_master: tuple | None = None  # a lima2 stream: (file, dataset) of frames
        self.saving_dir: str | None = None  # the scan file's folder (lima paths relative)
        try:
            self._definition = _definition(name, model)
            if self._definition.encoding == "references":
                self.lima = LimaFiles.from_info(name, self._definition.info)
            elif self._definition.info.get("plugin") == "lima2":
                self.lima2_master = tuple(self._definition.info["master_file"])
        except Bliss2Error as exc:
            self._error = str(exc)

    @property
    def definition(self) -> StreamDefinition:
        if self._definition is None:
            raise Bliss2Error(self._error)
        return self._definition

    def __len__(self) -> int:
        if self.lima is not None:
            return self.lima_status(self.scan.client.xrevrange(self.key, count=2))
        return self.length_from(self.scan.client.xrevrange(self.key, count=1))

    @staticmethod
    def length_from(last: list) -> int:
        """Points published, from XREVRANGE of the last entry (not for lima statuses)."""
        if not last:
            return 0
        entry_id, fields = last[0]
        if entry_id.decode() == SEAL_ENTRY:
            return int(fields[b"id"])
        return int(entry_id.split(b"-")[0]) + int(fields.get(b"len", 1))

    def lima2_frames(self) -> int:
        """The frames a lima2 detector holds: its newest count."""
        for entry_id, fields in self.scan.client.xrevrange(self.key, count=2):
            if entry_id.decode() != SEAL_ENTRY:
                count = int(fields.get(b"len", 1))
                return int(self.decode(fields[b"payload"], count)[-1])
        return 0

    def lima_status(self, entries) -> int:
        """Frames acquired: last_index + 1 of the newest status among `entries`."""
        frames = 0
        for entry_id, fields in entries:
            if entry_id.decode() != SEAL_ENTRY:
                try:
                    frames = max(frames, int(json.loads(fields[b"payload"])["last_index"]) + 1)
                except (KeyError, TypeError, ValueError) as exc:
                    raise Bliss2Error(f"stream {self.name!r}: lima status "
                                      f"{entry_id.decode()} unreadable: {exc}") from None
        return frames

    def decode(self, payload: bytes, count: int):
        """One entry's points: an array (n, *shape), or a list (varying shapes, json)."""
        d = self.definition
        if d.encoding == "json":
            return [json.loads(payload)]
        dtype = np.dtype(d.dtype)
        if d.varying:
            (shape, raw), _ = _unpack(payload)
            arr = np.frombuffer(raw, dtype=dtype).reshape((count, *shape))
            return list(arr)
        return np.frombuffer(payload, dtype=dtype).reshape((count, *d.shape))

    @property
    def file_backing(self) -> dict | None:
        raw = self.scan.client.hget(durable_key(self.scan.key), self.name)
        return json.loads(raw) if raw else None


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


# ---- scans ----------------------------------------------------------------------------
class Bliss2Scan:
    """A blissdata 2 scan with the surface of a native Scan that the scan writer uses."""

    def __init__(self, client: redis.Redis, key: str):
        self.client, self.key = client, key
        self.prefix = key.rsplit(":scan:", 1)[0]
        self._check_exists()
        self._doc = self._load_doc()
        last = client.xrevrange(self._state_key, count=1)
        if not last:
            raise ScanNotFoundError(f"blissdata 2 scan {key}: no state stream")
        self._state_id = last[0][0]
        self.state = ScanState(int(last[0][1][b"state"]))
        # the producer saves the document, then adds the state (one transaction): the
        # document read after the state is at least as new as it
        self._doc = self._load_doc()
        self._streams: dict[str, Bliss2Stream] = {}
        self._refresh_streams()

    def _check_exists(self) -> None:
        ttl = self.client.ttl(self.key)
        if ttl == -2 or 0 <= ttl <= DELETED_TTL_S:
            raise ScanNotFoundError(f"blissdata 2 scan {self.key} was deleted from Redis")

    def _load_doc(self) -> dict:
        raw = self.client.execute_command("JSON.GET", self.key)
        if raw is None:
            raise ScanNotFoundError(f"blissdata 2 scan {self.key} not found")
        doc = json.loads(raw)
        if not isinstance(doc, dict) or not isinstance(doc.get("info"), dict):
            raise Bliss2Error(f"blissdata 2 scan {self.key}: its JSON document has no info")
        return doc

    @property
    def _state_key(self) -> str:
        return f"{self.prefix}:stream:{self._doc['state_stream']['pk']}"

    def _refresh_streams(self) -> None:
        for name, model in (self._doc.get("data_streams") or {}).items():
            if name not in self._streams:
                key = f"{self.prefix}:stream:{model['pk']}"
                self._streams[name] = Bliss2Stream(self, name, key, model)

    @property
    def identity(self) -> dict:
        ident = dict(self._doc.get("id") or {})
        ident.setdefault("session", None)
        ident["session"] = ident["session"] or ""
        return ident

    @property
    def info(self) -> dict:
        return self._doc["info"]

    session = property(lambda self: self.identity["session"])
    name = property(lambda self: self.identity.get("name"))
    number = property(lambda self: self.identity.get("number"))
    path = property(lambda self: self.identity.get("path"))

    @property
    def streams(self) -> dict[str, Bliss2Stream]:
        return dict(self._streams)

    @property
    def redefined(self) -> dict:
        """Streams redeclared mid-scan: none (blissdata 2 fixes them at PREPARED)."""
        return {}

    def update(self, block: bool = True, timeout: float | None = None) -> bool:
        self._check_exists()
        if self.state == ScanState.CLOSED:
            return False
        block_ms = None if not block else (0 if timeout is None else max(1, int(timeout * 1e3)))
        reply = self.client.xread({self._state_key: self._state_id}, block=block_ms)
        if not reply:
            return False
        last_id, fields = reply[0][1][-1]
        self._state_id = last_id
        self.state = ScanState(int(fields[b"state"]))
        self._doc = self._load_doc()
        self._refresh_streams()
        return True

    def cursor(self, names, start=0, raw_chunks=False) -> Cursor:
        starts = start if isinstance(start, dict) else {n: start for n in names}
        return Cursor([self._streams[n] for n in names], starts)


# ---- h5map ----------------------------------------------------------------------------
_DTYPE = re.compile(r"^(bool|(int|uint)(8|16|32|64)|float(16|32|64|128)|complex(64|128|256))$")
_BINARY_DTYPE = re.compile(r"^(\|?[iub]1|[><]([iuf][248]|[fc](8|16)|c32))$")
H5_TYPES = ("group", "dataset", "external_binary_dataset", "soft_link", "external_link",
            "virtual_dataset")


@dataclass
class Node:
    """One h5map node: kind is group, static, stream, soft_link, external_link or
    external_binary; raw is its JSON (to tell what changed at the end of the scan)."""
    kind: str
    path: str
    raw: object
    attrs: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)
    value: object = None  # static: the array to write; stream: the stream name; links: target


def _vlen_strings(array: np.ndarray):
    """Strings as blissdata's InlineRaw.decode() gives them to h5py: variable length."""
    return np.vectorize(lambda x: x.encode(),
                        otypes=[np.dtype("O", metadata={"vlen": str})])(array)


def _raw_value(value, where: str):
    """blissdata.h5map.InlineRaw: JSON scalars/lists -> int64, float64, bool or str."""
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise Bliss2Error(f"{where}: value is not a regular array: {exc}") from None
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise Bliss2Error(f"{where}: non-finite values need an 'inline' item")
        return array.astype(np.float64)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind == "U":
        return _vlen_strings(array)
    raise Bliss2Error(f"{where}: value {value!r:.60} is not numbers, booleans or strings")


def decode_item(item, where: str):
    """A blissdata.h5map data item (not a stream) -> what h5py writes, as blisswriter."""
    kind = item.get("type") if isinstance(item, dict) else None
    if not isinstance(item, dict):
        if item is None:
            raise Bliss2Error(f"{where}: null is not a value")
        return _raw_value(item, where)
    try:
        if kind == "inline":
            if not _DTYPE.match(str(item["dtype"])):
                raise Bliss2Error(f"{where}: inline dtype {item['dtype']!r} is not a number type")
            return np.array(item["value"], dtype=item["dtype"])
        if kind == "inline_b64":
            if not _BINARY_DTYPE.match(str(item["dtype"])):
                raise Bliss2Error(f"{where}: inline_b64 dtype {item['dtype']!r} not accepted")
            value = np.frombuffer(base64.b64decode(item["value"]), dtype=item["dtype"])
            return value.reshape(item["shape"]) if item.get("shape") is not None else value
        if kind == "compound":
            columns = [(name, decode_item(col, f"{where}[{name}]"))
                       for name, col in item["columns"]]
            return np.rec.fromarrays([c for _, c in columns],
                                     names=[n for n, _ in columns]).view(np.ndarray)
    except (KeyError, TypeError, ValueError) as exc:
        raise Bliss2Error(f"{where}: {kind} item {json.dumps(item)[:80]} is malformed: "
                          f"{type(exc).__name__}: {exc}") from None
    raise Bliss2Error(f"{where}: data item type {kind!r} is not one blissdata "
                      f"{BLISSDATA_VERSION} defines (inline, inline_b64, compound, stream, "
                      "or a JSON value)")


def _attrs(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Bliss2Error(f"{where}: attributes must be a JSON object")
    return {k: decode_item(v, f"{where}@{k}") for k, v in raw.items()}


def parse_node(raw, path: str = "/") -> Node:
    """Check and decode an h5map node (and below); Bliss2Error names the path."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "group":
        children = raw.get("children") or {}
        if not isinstance(children, dict):
            raise Bliss2Error(f"{path}: group children must be a JSON object")
        node = Node("group", path, raw, _attrs(raw.get("attributes"), path))
        for name, child in children.items():
            if not name or "/" in name:
                raise Bliss2Error(f"{path}: child name {name!r} is not an HDF5 name")
            node.children[name] = parse_node(child, str(PurePosixPath(path) / name))
        return node
    if kind in ("soft_link", "external_link"):
        try:
            target = (raw["target_path"] if kind == "soft_link"
                      else (raw["target_file"], raw["target_path"]))
        except KeyError as exc:
            raise Bliss2Error(f"{path}: {kind} without {exc}") from None
        return Node(kind, path, raw, value=target)
    if kind == "external_binary_dataset":
        try:
            files = [(f["name"], int(f["offset"]),
                      h5py.h5f.UNLIMITED if f.get("size") is None else int(f["size"]))
                     for f in raw["files"]]
            value = (np.dtype(raw["dtype"]), tuple(raw["shape"]), files)
        except (KeyError, TypeError, ValueError) as exc:
            raise Bliss2Error(f"{path}: external_binary_dataset malformed: {exc}") from None
        return Node(kind, path, raw, _attrs(raw.get("attributes"), path), value=value)
    if kind == "virtual_dataset":
        raise Bliss2Error(f"{path}: virtual_dataset nodes are not written by this writer "
                          "version (blisswriter 3.0.0 skips them too)")
    # a dataset: {"type": "dataset", "attributes", "value"}, {"attributes", "value"}, or
    # its value alone (a JSON value or a data item)
    if isinstance(raw, dict) and kind in (None, "dataset"):
        if "value" not in raw:
            raise Bliss2Error(f"{path}: dataset without a value")
        attrs, value = _attrs(raw.get("attributes"), path), raw["value"]
    else:
        attrs, value = {}, raw
    if isinstance(value, dict) and value.get("type") == "stream":
        if not isinstance(value.get("stream"), str):
            raise Bliss2Error(f"{path}: stream item without a stream name")
        return Node("stream", path, raw, attrs, value=value["stream"])
    if isinstance(value, dict) and value.get("type") in H5_TYPES:
        raise Bliss2Error(f"{path}: a {value['type']} cannot be a dataset's value")
    if isinstance(value, dict) and value.get("type") not in (
            None, "inline", "inline_b64", "compound"):
        raise Bliss2Error(f"{path}: node type {value.get('type')!r} is not one blissdata "
                          f"{BLISSDATA_VERSION} defines ({', '.join(H5_TYPES)})")
    return Node("static", path, raw, attrs, value=decode_item(value, path))


def iter_nodes(node: Node):
    yield node
    for child in node.children.values():
        yield from iter_nodes(child)


@dataclass
class StreamNode:
    """Where a stream goes (what scan_writer's layout.streams holds)."""
    stream: str
    path: str
    attrs: dict


@dataclass
class H5MapLayout:
    file: str
    root: Node
    entry_name: str
    streams: list
    others: dict = field(default_factory=dict)  # other files: path -> root (static only)
    external_links: list = field(default_factory=list)


def _parse_root(file: str, raw) -> Node:
    if not isinstance(raw, dict) or raw.get("type", "group") != "group":
        raise Bliss2Error(f"h5maps[{file}]: the root must be a group")
    try:
        return parse_node({**raw, "type": "group"})
    except Bliss2Error as exc:
        raise Bliss2Error(f"h5maps[{file}] {exc}") from None


def plan(info: dict, stream_names: set, scan_path: str | None = None) -> H5MapLayout:
    """The layout of a scan from ``info["h5maps"]``; Bliss2Error names what is wrong.

    The scan's own file (its identity's path if h5maps names it, else the file with the
    streams, else the first) gets the streams; other files (master files linking to it, say)
    hold static nodes and links only."""
    h5maps = info.get("h5maps")
    if not isinstance(h5maps, dict) or not h5maps:
        raise Bliss2Error("info has no h5maps")
    roots = {file: _parse_root(file, raw) for file, raw in h5maps.items()}
    with_streams = [f for f, r in roots.items()
                    if any(n.kind == "stream" for n in iter_nodes(r))]
    if scan_path in roots:
        file = scan_path
    elif with_streams:
        file = with_streams[0]
    else:
        file = next(iter(roots))
    for other in with_streams:
        if other != file:
            node = next(n for n in iter_nodes(roots[other]) if n.kind == "stream")
            raise Bliss2Error(f"h5maps[{other}] {node.path}: streams are written to the "
                              f"scan's own file ({file}) only by this writer version")
    root = roots.pop(file)
    groups = [n for n, c in root.children.items() if c.kind == "group"]
    if not groups:
        raise Bliss2Error(f"h5maps[{file}]: no top-level group to hold the scan")
    streams = []
    for node in iter_nodes(root):
        if node.kind == "stream":
            if node.value not in stream_names:
                raise Bliss2Error(f"h5maps[{file}] {node.path}: stream {node.value!r} is not "
                                  f"a stream of the scan")
            streams.append(StreamNode(node.value, node.path, node.attrs))
    return H5MapLayout(file, root, groups[0], streams, others=roots)


def write_static(parent: h5py.Group, name: str, node: Node, check_file) -> None:
    """Write a node and what is below it, streams aside (json_h5_utils.save_h5_item)."""
    if node.kind == "group":
        group = parent.require_group(name) if name else parent
        group.attrs.update(node.attrs)
        for child_name, child in node.children.items():
            write_static(group, child_name, child, check_file)
    elif node.kind == "static":
        dset = parent.create_dataset(name, data=node.value)
        dset.attrs.update(node.attrs)
    elif node.kind == "soft_link":
        parent[name] = h5py.SoftLink(node.value)
    elif node.kind == "external_link":
        check_file(node.value[0])
        parent[name] = h5py.ExternalLink(*node.value)
    elif node.kind == "external_binary":
        dtype, shape, files = node.value
        for f in files:
            check_file(f[0])
        dset = parent.create_dataset(name, shape=shape, dtype=dtype, external=files)
        dset.attrs.update(node.attrs)


def write_missing(parent: h5py.Group, name: str, node: Node, check_file) -> None:
    """write_static, keeping what the file has already (a master file holds the entries of
    other scans; a resumed scan wrote its part before)."""
    if node.kind == "group":
        group = parent.require_group(name) if name else parent
        group.attrs.update(node.attrs)
        for child_name, child in node.children.items():
            write_missing(group, child_name, child, check_file)
    elif name not in parent:
        write_static(parent, name, node, check_file)


def stamp_root(h5: h5py.File) -> None:
    """The root attributes blisswriter 3.0.0 sets (not part of the h5map)."""
    now = datetime.datetime.now().astimezone().isoformat()
    for key, value in (("HDF5_Version", h5py.version.hdf5_version),
                       ("h5py_version", h5py.version.version), ("file_time", now)):
        if key not in h5.attrs:
            h5.attrs[key] = value
    h5.attrs["file_update_time"] = now


def apply_final(h5: h5py.File, before: Node, after: Node, check_file, warn) -> None:
    """The h5map as it is at CLOSED: what appeared is written, what went away is removed,
    what changed is rewritten; stream datasets keep their place (their attributes follow)."""
    def walk(old: Node | None, new: Node | None, path: str):
        if old is not None and new is not None and old.raw == new.raw:
            return
        parent_path, name = path.rsplit("/", 1) if path != "/" else ("", "")
        parent = h5[parent_path or "/"]
        if new is not None and new.kind == "stream" or old is not None and old.kind == "stream":
            if old is None or new is None or old.kind != new.kind or old.value != new.value:
                warn(f"{path}: a stream's place cannot change at the end of the scan; kept")
            elif path in h5:
                h5[path].attrs.update(new.attrs)
            return
        if new is None:
            if name in parent:
                del parent[name]
            return
        if old is not None and old.kind == new.kind == "group":
            group = h5[path]
            for key in set(old.attrs) - set(new.attrs):
                if key in group.attrs:
                    del group.attrs[key]
            group.attrs.update(new.attrs)
            for child in set(old.children) | set(new.children):
                walk(old.children.get(child), new.children.get(child),
                     f"{path.rstrip('/')}/{child}")
            return
        if name and name in parent:
            del parent[name]
        write_static(parent, name, new, check_file)

    walk(before, after, "/")


# ---- the scan writer ------------------------------------------------------------------
class Bliss2ScanWriter(ScanWriter):
    """The scan writer on a blissdata 2 scan: the file and tree come from h5maps."""

    protocol = "blissdata2"
    # blissdata 2 sends a point per stream per entry (no batching across streams): at 50 Hz
    # the producer "pauses" between every point; flushing each time costs more than it gains
    idle_flush_after_s = 0.2
    # varying shapes padded as blisswriter 3.0.0 does, with no dataset of shapes beside
    varying_appender = DatasetAppender
    # json points as variable-length strings, as blisswriter 3.0.0 writes them
    json_appender = TextAppender
    # objects made at CLOSED, as blisswriter 3 does: not SWMR (docs/files.md)
    writes_swmr = False

    def run(self) -> None:
        # this thread compresses only small pieces (partial chunks; full ones go to the pool):
        # an OpenMP team per call costs more than it gains, above all on a busy machine
        from blissdata import bslz4

        bslz4.set_openmp_threads(1)
        super().run()

    def _published(self, names: list) -> int:
        """Points published in these streams, the last entries read in one round trip."""
        streams = [self.scan.streams[n] for n in names]
        plain = [s for s in streams if s.lima is None]
        pipe = self.scan.client.pipeline(transaction=False)
        for stream in plain:
            pipe.xrevrange(stream.key, count=1)
        return (sum(Bliss2Stream.length_from(last) for last in pipe.execute())
                + sum(len(s) for s in streams if s.lima is not None))

    def _mark_durable(self, durable: dict) -> None:
        """All watermarks in one round trip (64 counters are 64 streams), only while this
        writer holds the scan's lease (fencing, as for native scans)."""
        lease_key, token = self.lease.fence
        args = [token, DURABLE_TTL_S]
        for name, points in durable.items():
            args += [name, json.dumps({"file": str(self.file_path),
                                       "dataset": self.dataset_paths[name],
                                       "points": int(points)})]
        try:
            self.service.redis.eval(_MARK_DURABLE, 2, durable_key(self.scan_key), lease_key,
                                    *args)
        except redis.ResponseError as exc:
            if "LEASELOST" not in str(exc):
                raise
            raise LeaseLostError(f"scan {self.scan_key}: watermarks not published: another "
                                 "writer holds the scan's lease") from None

    def _trimmable(self, durable: dict) -> dict:
        """Not a lima stream's entries: they are statuses, not frames, and its readers need
        the newest one."""
        return {n: p for n, p in durable.items() if self.scan.streams[n].lima is None}

    def _link_lima2(self, h5: h5py.File) -> None:
        """Lima2 streams with frames: an external link to the master file, its path relative
        to the scan file's folder when below it (blisswriter 3.0.0's Lima2StreamWriter)."""
        for path, stream in self.lima2_links:
            parent_path, name = path.rsplit("/", 1)
            parent = h5[parent_path or "/"]
            if name in parent or not stream.lima2_frames():
                continue
            file, dataset = stream.lima2_master
            try:
                file = str(PurePosixPath(file).relative_to(PurePosixPath(self.layout.file).parent))
            except ValueError:
                pass
            parent[name] = h5py.ExternalLink(file, dataset)

    def _load_scan(self):
        return Bliss2Scan(self.service.redis, self.scan_key)

    def _skip_reason(self) -> str | None:
        if not self.scan.path:
            return "no path in the scan identity: not to be saved (as blisswriter 3.0.0)"
        if not self.scan.info.get("h5maps"):
            return "no h5maps in the scan info: nothing to write (as blisswriter 3.0.0)"
        return None

    def _plan(self):
        layout = plan(self.scan.info, set(self.scan.streams), self.scan.path)
        self.lima2_links: list = []  # (HDF5 path, lima2 stream)
        for node in list(layout.streams):
            stream = self.scan.streams[node.stream]
            stream.definition  # Bliss2Error names the stream
            if stream.lima is not None and not stream.lima.saved:
                # blisswriter 3.0.0 drops the stream with a warning, writes the rest
                layout.streams.remove(node)
                self.status.warn(f"stream {node.stream!r} not written ({node.path}): lima "
                                 "saving is off, no file holds its frames (as blisswriter "
                                 "3.0.0)")
            elif stream.lima is not None:
                stream.saving_dir = str(PurePosixPath(layout.file).parent)
            elif stream.lima2_master is not None:
                # an external link to the detector's master file, made at the end of the
                # scan as blisswriter 3.0.0 does (its frame count is known then)
                layout.streams.remove(node)
                check_link_target(stream.lima2_master[0], layout.file, self.config.data_roots)
                self.lima2_links.append((node.path, stream))
        self.file_path = resolve_scan_file(layout.file, self.config.data_roots)
        for file, root in [(layout.file, layout.root), *layout.others.items()]:
            resolve_scan_file(file, self.config.data_roots)
            for node in iter_nodes(root):
                if node.kind == "external_link":
                    check_link_target(node.value[0], file, self.config.data_roots)
                elif node.kind == "external_binary":
                    for f in node.value[2]:
                        check_link_target(f[0], file, self.config.data_roots)
        return layout

    def _write_others(self, roots: dict, before: dict | None = None) -> None:
        """The static content of the other files of h5maps (master files...): what is not
        there yet, or at the end (`before`: the roots written first) what changed."""
        for file, root in roots.items():
            path = resolve_scan_file(file, self.config.data_roots)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.service.files.acquire(path)
            try:
                with handle.lock:
                    def check(target, file=str(path)):
                        check_link_target(target, file, self.config.data_roots)
                    if before is not None and file in before:
                        apply_final(handle.h5, before[file], root, check, self.status.warn)
                    write_missing(handle.h5, "", root, check)  # also after a resume
                    stamp_root(handle.h5)
                    handle.h5.flush()
            finally:
                self.service.files.release(handle)

    @property
    def entry_name(self) -> str:
        return self.layout.entry_name

    def _new_entry(self, h5, layout):
        """The h5map's static part, as blisswriter writes it at PREPARED."""
        if layout.entry_name in h5:
            raise ScanFailed(f"{layout.entry_name} already exists in {self.file_path}; not "
                             "overwritten")
        write_static(h5, "", layout.root, self._check_source)
        stamp_root(h5)
        self._write_others(layout.others)
        return h5[layout.entry_name]

    def _write_header_note(self) -> None:
        pass  # the scan header note is for native scans (blissdata.archive replays them)

    def _dataset_parent(self, path: str):
        return stream_dataset_parent(self.file.h5, path)

    def _info_updated(self) -> None:
        pass  # blissdata 2 info changes only at CLOSED: _finalize applies it

    def _end_failed_entry(self, end_reason: str) -> None:
        pass  # blisswriter writes no end_reason: the writer_status note says why

    def _finalize(self) -> None:
        self._wait_for(ScanState.CLOSED)
        with self.file.lock:
            h5 = self.file.h5
            try:
                final = plan(self.scan.info, set(self.scan.streams), self.scan.path)
            except Bliss2Error as exc:
                self.status.warn(f"final h5maps not applied: {exc}")
            else:
                if final.file != self.layout.file:
                    self.status.warn(f"final h5maps names another file ({final.file}); "
                                     "not written")
                else:
                    apply_final(h5, self.layout.root, final.root, self._check_source,
                                self.status.warn)
                    stamp_root(h5)
                    self._write_others(final.others, before=self.layout.others)
            self._link_lima2(h5)
            self.status.state = "done"
            self.entry = h5[self.entry_name]
            writer_status.write_note(self.entry, self.status)
            h5.flush()
        self._publish_final_status()
        log.info("scan %s %s:%s done: %s in each of %d streams -> %s::/%s (%s)",
                 self.scan_key, self.scan.session, self.scan.number,
                 self.status.points_text(), len(self.appenders), self.file_path,
                 self.entry_name, self.scan.info.get("end_reason"))


# ---- following the scans --------------------------------------------------------------
class Bliss2Follower(threading.Thread):
    """Follows ``_SCAN_HISTORY_`` and starts a Bliss2ScanWriter per scan of the wanted
    sessions; at start, resumes the scans a crash interrupted and those still running."""

    def __init__(self, service, stop: threading.Event):
        super().__init__(name="follow-blissdata2", daemon=True)
        self.service, self.client, self._stop = service, service.redis, stop
        self._not_wanted: set[str] = set()  # listed scans of sessions this writer skips

    def _identity(self, key: str) -> dict | None:
        raw = self.client.execute_command("JSON.GET", key, "$.id")
        found = json.loads(raw) if raw else []
        return found[0] if found and isinstance(found[0], dict) else None

    def _offer(self, key: str) -> None:
        """Write the scan if it is of a wanted session and no other writer of the pool has
        it (the same scan and file leases as native scans; writer/pool.py). The scan is
        listed as unfinished (UNFINISHED_BLISS2) until its writer is done: if another writer
        holds it and dies, its leases expire and the sweep (`sweep`) of any writer of the
        pool takes the scan over, resuming it from the file and the durable watermarks."""
        if key in self._not_wanted or key in self.service.writers:
            return
        pool = self.service.writer_pool
        try:
            identity = self._identity(key)
        except redis.ResponseError as exc:  # not a JSON document: not a blissdata 2 scan
            log.warning("blissdata 2 scan %s unreadable: %s", key, exc)
            self._not_wanted.add(key)
            return
        if identity is None:  # deleted from Redis
            pool.finished(key)
            return
        if not self.service.wants(identity.get("session") or ""):
            self._not_wanted.add(key)
            return
        previous = writer_status.read(self.client, key)
        if previous is not None and previous.finished:
            pool.finished(key)
            return
        pool.offer(key, listing=UNFINISHED_BLISS2)
        if pool.acquire(key, identity.get("path") or f"(no path) {key}") is None:
            return  # another writer has it; the sweep tries again
        previous = writer_status.read(self.client, key)  # its writer may just have ended
        if previous is not None and previous.finished:
            pool.release(key)
            pool.finished(key)
            return
        if previous is not None and previous.state == "writing" and \
                previous.writer != self.service.identity:
            pool.takeover_count += 1
            self.service.metrics.takeovers.inc()
            log.info("scan %s: taking it over from writer %s", key, previous.writer)
        self.service.start_scan(key, Bliss2ScanWriter)

    def sweep(self) -> None:
        """Take the listed blissdata 2 scans whose lease nobody holds: new ones, and those
        of a writer that stopped renewing its leases (killed, cut off)."""
        for key in self.service.writer_pool.candidates(UNFINISHED_BLISS2):
            self._offer(key)

    def resume(self) -> str:
        """Start writers for interrupted or running scans; the history position to follow
        from."""
        since = "0-0"
        for entry_id, fields in self.client.xrange(SCAN_HISTORY):
            since = entry_id.decode()
            key = fields[b"key"].decode()
            previous = writer_status.read(self.client, key)
            if previous is not None:
                if not previous.finished:
                    self._offer(key)
                continue
            ttl = self.client.ttl(key)
            if ttl == -2 or 0 <= ttl <= DELETED_TTL_S:
                continue
            try:
                state_pk = json.loads(self.client.execute_command(
                    "JSON.GET", key, "$.state_stream.pk"))[0]
            except (redis.ResponseError, TypeError, IndexError):
                continue
            prefix = key.rsplit(":scan:", 1)[0]
            last = self.client.xrevrange(f"{prefix}:stream:{state_pk}", count=1)
            if last and int(last[0][1][b"state"]) < ScanState.CLOSED:
                self._offer(key)
        return since

    def run(self) -> None:
        since = None
        last_sweep = 0.0
        while not self._stop.is_set():
            try:
                if since is None:
                    since = self.resume()
                if time.monotonic() - last_sweep >= self.service.writer_pool.sweep_s:
                    last_sweep = time.monotonic()
                    self.sweep()
                reply = self.client.xread({SCAN_HISTORY: since}, block=500, count=64)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("Redis unreachable while following blissdata 2 scans (%s); "
                            "retrying", exc)
                self._stop.wait(1.0)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    since = entry_id.decode()
                    self._offer(fields[b"key"].decode())
