"""A blissdata 2 scan and its streams, with the surface of a native scan that the scan
writer uses (identity, info, streams, update, cursor)."""

from __future__ import annotations

import json

import numpy as np
import redis

from blissdata import ScanNotFoundError, ScanState
from blissdata.encoding import StreamDefinition

from .cursor import Cursor
from .lima import LimaFiles, lima2_definition
from .protocol import (BLISSDATA_VERSION, DELETED_TTL_S, SEAL_ENTRY, Bliss2Error, durable_key,
                       unpack_msgpack)


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
            (shape, raw), _ = unpack_msgpack(payload)
            arr = np.frombuffer(raw, dtype=dtype).reshape((count, *shape))
            return list(arr)
        return np.frombuffer(payload, dtype=dtype).reshape((count, *d.shape))

    @property
    def file_backing(self) -> dict | None:
        raw = self.scan.client.hget(durable_key(self.scan.key), self.name)
        return json.loads(raw) if raw else None


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
