"""The durable watermark of a stream: the writer marks the points it stored in a file
(`mark_file_backed`), readers and the memory tracker read it (`file_backing`)."""

from __future__ import annotations

import json

import redis

from . import keys
from .exceptions import LeaseLostError

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


class FileBackedMarks:
    """The watermark part of `Stream` (mixed into it): publishing and reading where its
    points are durable. Uses the stream's `name`, `_scan`, `_store` and `_redis`."""

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

    @property
    def file_backing(self) -> dict | None:
        """{"file", "dataset", "points"} once the writer marked this stream, else None."""
        raw = self._redis.hget(keys.durable_key(self._scan.key), self.name)
        return json.loads(raw) if raw else None
