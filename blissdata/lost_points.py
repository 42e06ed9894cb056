"""Points lost for good: trimmed from Redis before any file held them.

Each scan keeps, per stream, its lost ranges ``[[start, stop], ...]`` (stop excluded) in
``<scan>:lost`` (docs/protocol.md). The memory tracker adds the ranges it trims above its
hard limit; the writer adds the gaps it finds (points trimmed past its watermark by anyone).
The writer keeps them in the file too (``writer_status`` "lost_points"). Readers raise
IndexNoMoreThereError naming them for any read that touches them, even where the file has
fill values in their place.
"""

from __future__ import annotations

import json

from . import keys

# Add [ARGV[2], ARGV[3]) to the ranges of stream ARGV[1]: sorted, touching ranges merged,
# in one step (the tracker and the writer may both add at once).
_RECORD = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local ranges = raw and cjson.decode(raw) or {}
table.insert(ranges, {tonumber(ARGV[2]), tonumber(ARGV[3])})
table.sort(ranges, function(a, b) return a[1] < b[1] end)
local merged = {}
for _, r in ipairs(ranges) do
  local last = merged[#merged]
  if last and r[1] <= last[2] then
    if r[2] > last[2] then last[2] = r[2] end
  else
    table.insert(merged, {r[1], r[2]})
  end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(merged))
return #merged
"""
_RECORD_ALLOW_OOM = "#!lua flags=allow-oom" + _RECORD


def record(client, scan_key: str, stream: str, start: int, stop: int,
           allow_oom: bool = False) -> None:
    """Add points [start, stop) of `stream` to the scan's lost ranges in Redis.
    `allow_oom` (Redis >= 7): recorded even while Redis is full."""
    script = _RECORD_ALLOW_OOM if allow_oom else _RECORD
    # EVAL as a raw command: the same call works on a cluster client
    client.execute_command("EVAL", script, 1, keys.lost_key(scan_key), stream,
                           int(start), int(stop))


def ranges_of(raw) -> list[list[int]]:
    """Ranges as stored (JSON text, bytes or None)."""
    return [[int(a), int(b)] for a, b in json.loads(raw)] if raw else []


def merged(ranges) -> list[list[int]]:
    """Sorted, touching or overlapping ranges joined."""
    out: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def overlapping(ranges, start: int, stop: int) -> list[list[int]]:
    """The ranges that share a point with [start, stop)."""
    return [[a, b] for a, b in ranges if a < stop and b > start]


def describe(lost: dict) -> str:
    """{stream: ranges} in a few words: "'x' [20, 90), 'y' [5, 8)" (first ranges only)."""
    parts = []
    for name, ranges in lost.items():
        shown = ", ".join(f"[{a}, {b})" for a, b in ranges[:5])
        more = f" and {len(ranges) - 5} more ranges" if len(ranges) > 5 else ""
        parts.append(f"{name!r} {shown}{more}")
    return "; ".join(parts)


def count(lost: dict) -> int:
    """Points in every range of {stream: ranges}."""
    return sum(b - a for ranges in lost.values() for a, b in ranges)


# Set the lost ranges of streams at once: ARGV = name, JSON ranges ("" removes the field).
_REPLACE = """
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""
_REPLACE_ALLOW_OOM = "#!lua flags=allow-oom" + _REPLACE


def replace(client, scan_key: str, lost: dict, streams, allow_oom: bool = False) -> None:
    """Set the lost ranges of `streams` to `lost` ({stream: ranges}; a stream not in it has
    none). The writer does it once every point is in its file: what the tracker recorded
    as lost while the writer still held the points in memory is not lost."""
    args = []
    for name in streams:
        args += [name, json.dumps(merged(lost[name])) if lost.get(name) else ""]
    if args:
        script = _REPLACE_ALLOW_OOM if allow_oom else _REPLACE
        client.execute_command("EVAL", script, 1, keys.lost_key(scan_key), *args)


def coarsened(ranges, most: int) -> list[list[int]]:
    """At most `most` ranges covering every point of `ranges` (the closest neighbours
    joined, with the points between them: never fewer points called lost)."""
    out = merged(ranges)
    while len(out) > max(1, most):
        i = min(range(len(out) - 1), key=lambda k: out[k + 1][0] - out[k][1])
        out[i:i + 2] = [[out[i][0], out[i + 1][1]]]
    return out


def recorded_in(entry) -> dict:
    """{stream: ranges} the writer recorded as lost in an HDF5 entry (an h5py group; its
    ``writer_status`` note, key "lost_points"), {} if none."""
    note = entry.get("writer_status/data")
    if note is None:
        return {}
    raw = note[()]
    try:
        status = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    found = status.get("lost_points") if isinstance(status, dict) else None
    return {n: [[int(a), int(b)] for a, b in ranges] for n, ranges in (found or {}).items()}
