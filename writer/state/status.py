"""The writer's status of each scan, kept in Redis (for `blisswriter status`, from any machine)
and in the scan's entry (an NXnote), so that a crash or a failure is visible in both places.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import redis

from blissdata import keys, lost_points
from blissdata.exceptions import LeaseLostError

# Sorted set: scan key -> time of the writer's last status update. `blisswriter status` lists it.
WRITER_SCANS = "blissdata:writer:scans"
RECENT_S = 24 * 3600  # finished scans stay listed this long


@dataclass
class ScanStatus:
    scan_key: str
    session: str = ""
    number: int = 0
    name: str = ""
    # waiting, writing, idle (no event for inactivity_timeout_s), done, failed, skipped
    # ("save": false); "failed" also when points were lost in Redis (see lost_points)
    state: str = "waiting"
    file: str = ""
    entry: str = ""
    expected_points: int | None = None
    points: dict = field(default_factory=dict)  # stream -> points durable in the file
    bytes_written: int = 0  # uncompressed bytes of the points durable in the file
    lag_points: int = 0  # points published but not yet durable, all streams
    write_rate_mb_s: float = 0.0
    warnings: list = field(default_factory=list)
    error: str = ""
    started: float = 0.0
    updated: float = 0.0
    writer: str = ""  # host:pid of the writer process
    lease: str = ""  # token of the writer's lease on the scan: publish() is fenced by it
    held_by: str = ""  # writer holding the scan's lease when read (read_recent), "" if none
    file_bytes: int = 0  # size of the scan's file once written (its own file: docs/files.md)
    stored_bytes: int = 0  # bytes of its datasets' stored data then (the rest: metadata...)
    # stream -> [[start, stop], ...]: points trimmed from Redis before the writer stored them;
    # in the file they hold the fill value (readers raise IndexNoMoreThereError for them)
    lost_points: dict = field(default_factory=dict)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def points_text(self) -> str:
        """The scan's points, for a log line: "60 points" (every stream), or "58 to 60
        points" when its streams hold different numbers (an aborted scan)."""
        counts = sorted(set(self.points.values())) or [0]
        if len(counts) == 1:
            return f"{counts[0]} points"
        return f"{counts[0]} to {counts[-1]} points"

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "skipped")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw) -> "ScanStatus":
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# Set the status only while the scan's lease holds the writer's token (fencing: a writer
# that lost the scan to another must not overwrite that one's status).
_FENCED_HSET = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('LEASELOST') end
return redis.call('HSET', KEYS[1], 'status', ARGV[2])
"""


def publish(client: redis.Redis, status: ScanStatus) -> bool:
    """Put a scan's status in Redis. False when Redis is full (maxmemory): a status is not
    worth failing a scan for; it goes out with the next publish. With ``status.lease`` set,
    LeaseLostError (and nothing written) if the scan's lease holds another token."""
    status.updated = time.time()
    if status.lease:
        try:
            client.eval(_FENCED_HSET, 2, keys.writer_key(status.scan_key),
                        keys.lease_key(status.scan_key), status.lease, status.to_json())
        except redis.OutOfMemoryError:
            return False
        except redis.ResponseError as exc:
            if "OOM" in str(exc):  # refused inside the script
                return False
            if "LEASELOST" not in str(exc):
                raise
            raise LeaseLostError(f"scan {status.scan_key}: status not published, this "
                                 f"writer no longer holds the scan's lease") from None
    pipe = client.pipeline(transaction=False)
    if not status.lease:
        pipe.hset(keys.writer_key(status.scan_key), "status", status.to_json())
    pipe.zadd(WRITER_SCANS, {status.scan_key: status.updated})
    pipe.zremrangebyscore(WRITER_SCANS, 0, status.updated - RECENT_S)
    try:
        pipe.execute()
    except redis.OutOfMemoryError:
        return False
    return True


def read(client: redis.Redis, scan_key: str) -> ScanStatus | None:
    raw = client.hget(keys.writer_key(scan_key), "status")
    return ScanStatus.from_json(raw) if raw else None


def read_recent(client: redis.Redis, since_s: float = RECENT_S) -> list[ScanStatus]:
    """Every scan the writer worked on in the last `since_s` seconds, oldest first."""
    scan_keys = client.zrangebyscore(WRITER_SCANS, time.time() - since_s, "+inf")
    pipe = client.pipeline(transaction=False)
    for key in scan_keys:
        pipe.hget(keys.writer_key(key.decode()), "status")
        pipe.get(keys.lease_key(key.decode()))
    replies = pipe.execute()
    found = []
    for raw, token in zip(replies[::2], replies[1::2]):
        if raw:
            status = ScanStatus.from_json(raw)
            status.held_by = token.decode().split("/")[0] if token else ""
            found.append(status)
    return found


def write_json_note(entry, name: str, data: str, description: str) -> None:
    """An NXnote `<entry>/<name>` holding JSON text (replaced if there)."""
    note = entry.require_group(name)
    note.attrs["NX_class"] = "NXnote"
    for key, value in (("type", "application/json"), ("data", data),
                       ("description", description)):
        if key in note:
            del note[key]
        note[key] = value


#: room for the status JSON in the file: it is rewritten in place (SWMR allows no new object)
NOTE_BYTES = 16 * 1024


def write_note(entry, status: ScanStatus) -> None:
    """The status as an NXnote `<entry>/writer_status`; its `data` is a fixed-length string
    with room to change in place while the file is written in SWMR mode (a status too long
    for it keeps its last warnings and the start of its error)."""
    text = status.to_json().encode()
    data = entry.get("writer_status/data")
    if data is None or data.dtype.kind != "S" or data.shape != ():
        write_json_note(entry, "writer_status", "", "blisswriter status of this scan")
        del entry["writer_status/data"]
        size = max(NOTE_BYTES, 2 * len(text))
        data = entry["writer_status"].create_dataset("data", shape=(), dtype=f"S{size}")
    room = data.dtype.itemsize
    if len(text) > room:
        short = ScanStatus.from_json(text)
        short.warnings = short.warnings[-3:]
        short.error = short.error[:room // 2]
        most = 256
        text = short.to_json().encode()
        while len(text) > room and most > 1:  # fewer, wider lost ranges: never fewer points
            most //= 2
            short.lost_points = {n: lost_points.coarsened(r, most)
                                 for n, r in short.lost_points.items()}
            text = short.to_json().encode()
        text = text[:room]
    data[()] = np.bytes_(text)


def write_header_note(entry, scan, dataset_paths: dict) -> None:
    """The scan's header as an NXnote `<entry>/scan_header`: identity, info (with the
    mapping), stream definitions and where each stream's dataset is, so an archived scan can
    be reopened and replayed as it was published (blissdata.archive)."""
    header = {"identity": scan.identity, "info": scan.info,
              "streams": {n: s.definition.to_json() for n, s in scan.streams.items()},
              "datasets": dataset_paths}
    write_json_note(entry, "scan_header", json.dumps(header),
                    "the scan header as published (blissdata protocol 1)")


def done_points(st: ScanStatus) -> int:
    return min(st.points.values()) if st.points else 0


def select(statuses: list, session: str | None = None, state: str | None = None,
           last: int | None = 10) -> tuple[list, int]:
    """The scans to show: those of ``session`` and in ``state`` (None: any); of them, every
    scan not finished and the ``last`` finished most recently (None: all). Returns (the
    scans, oldest first, and how many finished ones were left out)."""
    chosen = [st for st in statuses if (session is None or st.session == session)
              and (state is None or st.state == state)]
    finished = sorted((st for st in chosen if st.finished), key=lambda st: st.updated)
    if last is None or len(finished) <= last:
        return chosen, 0
    kept = {id(st) for st in finished[len(finished) - last:]} if last else set()
    shown = [st for st in chosen if not st.finished or id(st) in kept]
    return shown, len(finished) - last
