"""A scan: identity, JSON info, a published state machine and its streams."""

from __future__ import annotations

import datetime
import enum
import json

import redis

from . import keys
from .encoding import StreamDefinition, make_definition
from .exceptions import ScanNotFoundError, ScanStateError, StreamError
from .mapping import json_compatible
from .schemas import validate_scan_info
from .cursor import CursorGroup
from .stream import Stream
from .waiting import Deadline, wait_for


class ScanState(enum.IntEnum):
    CREATED = 0
    PREPARED = 1
    STARTED = 2
    STOPPED = 3
    CLOSED = 4


class EndReason(str, enum.Enum):
    SUCCESS = "SUCCESS"
    USER_ABORT = "USER_ABORT"
    FAILURE = "FAILURE"
    DELETION = "DELETION"


# Move a scan from one state to the next atomically, so two processes cannot both do it.
# KEYS: scan hash, state stream. ARGV: allowed current states (comma list), new state,
# then field/value pairs to set on the hash. The stream declarations ("streams", set at
# PREPARED) also go into the state entry: stream entries cannot be rewritten, so readers
# always know the definitions the points were sent with (see Scan.redefined).
_TRANSITION = """
local current = redis.call('HGET', KEYS[1], 'state')
if not current then return redis.error_reply('NOSCAN') end
local allowed = false
for s in string.gmatch(ARGV[1], '[^,]+') do if s == current then allowed = true end end
if not allowed then return redis.error_reply('BADSTATE ' .. current) end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
local entry = {'state', ARGV[2]}
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  if ARGV[i] == 'streams' then table.insert(entry, 'streams'); table.insert(entry, ARGV[i + 1]) end
end
redis.call('XADD', KEYS[2], '*', unpack(entry))
return current
"""

_ALLOWED_BEFORE = {
    ScanState.PREPARED: (ScanState.CREATED,),
    ScanState.STARTED: (ScanState.PREPARED,),
    ScanState.STOPPED: (ScanState.STARTED,),
    ScanState.CLOSED: (ScanState.CREATED, ScanState.PREPARED, ScanState.STARTED,
                       ScanState.STOPPED),
}


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat()


class Scan:
    """Created by `DataStore.create_scan` (producer) or `DataStore.load_scan` (reader)."""

    def __init__(self, store, key: str, fields: dict, state_id="0-0"):
        self._store = store
        self.key = key
        self._state_id = state_id  # last state entry seen, for update()
        self._streams: dict[str, Stream] = {}
        # streams whose declaration in Redis changed after prepare: name -> new definition
        # (their points are still decoded with the definition they were prepared with)
        self.redefined: dict[str, StreamDefinition] = {}
        self._load(fields)

    def __repr__(self):
        i = self.identity
        return (f"<Scan {i.get('session')}:{i.get('number')} {i.get('name')} "
                f"{self.state.name} key={self.key}>")

    # ---- loading -----------------------------------------------------------------------
    def _load(self, fields: dict) -> None:
        self.identity = json.loads(fields[b"identity"])
        self.info = json.loads(fields[b"info"])
        self.state = ScanState[fields[b"state"].decode()]
        current = json.loads(fields.get(b"streams", b"{}"))
        if self.state >= ScanState.PREPARED and not self._streams:
            prepared = self._prepared_definitions() or current
            for name, d in prepared.items():
                self._streams[name] = Stream(self, StreamDefinition.from_json(d))
        # A stream keeps the definition it was prepared with: its points were sent with it.
        # A faulty producer rewriting the declarations later shows up in `redefined`
        # instead of making readers decode the points already sent with the new one.
        for name, d in current.items():
            definition = StreamDefinition.from_json(d)
            if name not in self._streams:
                self._streams[name] = Stream(self, definition)
            elif definition != self._streams[name].definition:
                self.redefined[name] = definition

    def _prepared_definitions(self) -> dict | None:
        """The declarations as published at PREPARED (in the state stream), or None if that
        entry is gone or came from a producer that did not record them there."""
        for _, fields in self._store.redis.xrange(keys.state_key(self.key), count=16):
            if b"streams" in fields:
                return json.loads(fields[b"streams"])
        return None

    def reload(self) -> None:
        """Read the scan's info, state and stream declarations from Redis again."""
        fields = self._store.redis.hgetall(self.key)
        if not fields:
            raise ScanNotFoundError(f"scan {self.key} no longer exists (deleted or expired)")
        self._load(fields)

    @property
    def store(self):
        """The DataStore this scan was created or loaded with."""
        return self._store

    @property
    def session(self) -> str:
        return self.identity["session"]

    @property
    def name(self) -> str:
        return self.identity["name"]

    @property
    def number(self) -> int:
        return self.identity["number"]

    @property
    def path(self) -> str:
        return self.identity["path"]

    @property
    def streams(self) -> dict[str, Stream]:
        return dict(self._streams)

    def cursor(self, names=None, start: int | dict = 0, raw_chunks: bool = False) -> CursorGroup:
        names = list(self._streams) if names is None else names
        unknown = [n for n in names if n not in self._streams]
        if unknown:
            raise StreamError(f"scan {self.key} has no stream {unknown}; "
                              f"it has {sorted(self._streams)}")
        return CursorGroup([self._streams[n] for n in names], start=start,
                           raw_chunks=raw_chunks)

    # ---- waiting for changes (readers) -------------------------------------------------
    def update(self, block: bool = True, timeout: float | None = None) -> bool:
        """Wait for the next state change; True if the state changed (info reloaded), False
        when `timeout` seconds (None: for ever) passed without one, or at once if not
        `block`. A lost connection is retried (RedisUnreachableError if it stays lost)."""
        if not block:
            return self._next_state(None)
        changed = wait_for(self._store, lambda block_ms: self._next_state(block_ms) or None,
                           Deadline(timeout), f"waiting for a state change of scan {self.key}")
        return bool(changed)

    def _next_state(self, block_ms: int | None) -> bool:
        """One XREAD of the state stream; reloads the scan if the state changed."""
        reply = self._store.redis.xread({keys.state_key(self.key): self._state_id},
                                         block=block_ms)
        if not reply:
            return False
        self.reload()
        self._state_id = reply[0][1][-1][0]  # after the reload: a retry reads it again
        return True

    # ---- producer ------------------------------------------------------------------------
    def create_stream(self, name: str, dtype=None, shape=(), encoding: str = "numeric",
                      info: dict | None = None) -> Stream:
        """Declare a stream (before prepare). `shape` is the point shape; -1 = varies."""
        if self.state != ScanState.CREATED:
            raise ScanStateError(f"scan {self.key}: streams are declared before prepare(), "
                                 f"the scan is {self.state.name}")
        if name in self._streams:
            raise StreamError(f"scan {self.key}: stream {name!r} is already declared")
        stream = Stream(self, make_definition(name, dtype, shape, encoding, info))
        self._streams[name] = stream
        return stream

    def _transition(self, new: ScanState, **fields) -> None:
        allowed = ",".join(s.name for s in _ALLOWED_BEFORE[new])
        argv = [allowed, new.name]
        for k, v in fields.items():
            argv += [k, v]
        try:
            self._store.while_full(
                lambda: self._store.redis.eval(_TRANSITION, 2, self.key,
                                                keys.state_key(self.key), *argv),
                f"scan {self.key} did not go to {new.name}")
        except redis.ResponseError as exc:
            message = str(exc)
            if "NOSCAN" in message:
                raise ScanNotFoundError(f"scan {self.key} no longer exists") from None
            if "BADSTATE" in message:
                current = message.split("BADSTATE", 1)[1].strip()
                raise ScanStateError(f"scan {self.key}: cannot go to {new.name} from "
                                     f"{current} (allowed from {allowed})") from None
            raise
        self.state = new

    def prepare(self) -> None:
        """Validate info against the schema, publish info and stream declarations."""
        if self.state != ScanState.CREATED:
            raise ScanStateError(f"scan {self.key}: cannot go to PREPARED from "
                                 f"{self.state.name}")
        # tuples (the talk's way of writing a mapping) and numpy values become JSON
        self.info = json_compatible(self.info, where=f"scan {self.key}: info $")
        validate_scan_info(self.info, where=f"scan {self.key}")
        streams = {n: s.definition.to_json() for n, s in self._streams.items()}
        self._transition(ScanState.PREPARED, info=json.dumps(self.info),
                         streams=json.dumps(streams))

    def start(self) -> None:
        self.info.setdefault("start_time", now_iso())
        self._transition(ScanState.STARTED, info=json.dumps(self.info))

    def stop(self) -> None:
        self._transition(ScanState.STOPPED)

    def close(self, end_reason: EndReason | str = EndReason.SUCCESS) -> None:
        """Seal every open stream, set info end_reason/end_time, go to CLOSED."""
        end_reason = EndReason(end_reason)
        if self.state == ScanState.CLOSED:
            raise ScanStateError(f"scan {self.key} is already CLOSED")
        for stream in self._streams.values():
            stream.seal_if_open()
        self.info.setdefault("end_time", now_iso())
        self.info["end_reason"] = end_reason.value
        self._transition(ScanState.CLOSED, info=json.dumps(self.info))

    def end_abandoned(self, end_reason: EndReason | str = EndReason.FAILURE,
                      message: str = "") -> None:
        """Close a scan whose producer is gone (killed, its host lost), from any process:
        seal each stream after the points it holds, then CLOSED with `end_reason` and
        `message` (info ``end_message``), so the writer finishes the file. Only for a scan
        whose producer no longer sends: a point sent after this is refused."""
        self.reload()
        if self.state == ScanState.CLOSED:
            raise ScanStateError(f"scan {self.key} is already CLOSED (end_reason "
                                 f"{self.info.get('end_reason')})")
        for stream in self._streams.values():
            stream.seal_after_last_point()
        self.info.setdefault("end_time", now_iso())
        self.info["end_reason"] = EndReason(end_reason).value
        if message:
            self.info["end_message"] = message
        self._transition(ScanState.CLOSED, info=json.dumps(self.info))

    def close_deleted(self) -> None:
        """Go to CLOSED with end_reason DELETION, streams left as they are: the scan is
        being deleted (`DataStore.delete_scan`). ScanStateError if it is CLOSED already."""
        self.info["end_reason"] = EndReason.DELETION.value
        self._transition(ScanState.CLOSED, info=json.dumps(self.info))

    def send_many(self, batches: dict) -> None:
        """Send to several streams in one round trip: {stream or name: data}."""
        if not batches:
            return
        resolved = {(s if isinstance(s, Stream) else self._streams[s]): d
                    for s, d in batches.items()}
        Stream.send_all(resolved)

    def check_can_send(self, stream: Stream) -> None:
        """Raise unless `stream` (one of this scan's) may send now: after prepare, before close."""
        if self.state not in (ScanState.PREPARED, ScanState.STARTED, ScanState.STOPPED):
            raise ScanStateError(f"scan {self.key}: cannot send to {stream.name!r} while the "
                                 f"scan is {self.state.name} (send after prepare, before close)")
        if self._streams.get(stream.name) is not stream:
            raise StreamError(f"scan {self.key}: stream {stream.name!r} is not one of its own")
