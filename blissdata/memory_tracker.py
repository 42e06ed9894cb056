"""`blissdata-memory-tracker`: keeps Redis memory under a budget.

Each round (every `interval_s`):

1. While `used_memory` > budget: trim data streams, oldest scans first, of entries whose
   points are all durable in a file (below the writer's watermark, `<scan>:durable`). Scans
   whose info says `"save": false` have no file to wait for: their streams are trimmed freely.
   A stream's last entry is never trimmed (the stream's length is read from it).
2. If memory is still above the hard limit: trim anyway (oldest scans first, keeping each
   stream's last entry), record the lost ranges in `<scan>:lost` and log each as an ERROR
   naming scan, stream and range (counted in the metrics: `--metrics-port`).
3. Closed scans get a TTL (`closed_ttl_s`) on all their keys; scans with no activity (no new
   point, no state change) for `inactive_ttl_s` are deleted; index entries of scans that are
   gone are removed.
4. Every `orphan_interval_s` (and at the first round): keys of a scan whose hash is gone
   (`<scan>:stream:*`, `:durable`, `:writer`, ... left by an older producer or a process
   that wrote after the scan was deleted) are found with SCAN and removed.

It refuses to start when the hard limit is below what Redis uses with no scan data (every
point would be trimmed before a writer could store it), and says so as an ERROR when Redis is
above the hard limit at start.

It keeps no state it cannot rebuild from Redis (only when it last saw activity): restarted, it
picks up where it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

import redis

from . import keys, lost_points
from .store import DataStore, url_from

log = logging.getLogger("blissdata.memory_tracker")
MB = 2**20

# Remove the keys of a scan only if its hash is (still) gone. KEYS[1] scan hash, then its
# other keys. Returns how many keys it removed.
_REMOVE_ORPHANS = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local removed = 0
for i = 2, #KEYS do removed = removed + redis.call('DEL', KEYS[i]) end
return removed
"""


def keep_from(client, data_key: str, upto: int) -> int | None:
    """First index to keep so no point >= `upto` is removed and the last entry stays:
    the first point of the entry holding point `upto`, or of the last entry."""
    last = client.xrevrange(data_key, "+", "-", count=1)
    if not last:
        return None
    last_first = keys.first_index(last[0][0])
    holding = client.xrevrange(data_key, keys.entry_id(upto), "-", count=1)
    keep = keys.first_index(holding[0][0]) if holding else 0
    if holding and b"end" not in holding[0][1]:
        n = int(holding[0][1][b"n"])
        if keep + n <= upto:  # that entry ends below `upto`: it can go too
            keep = upto
    return min(keep, last_first)


def trim_durable(client, data_key: str, durable: int) -> int:
    """Remove the entries whose points are all below `durable` (all in a file); the number
    of entries removed. XTRIM works even when Redis is at maxmemory."""
    keep = keep_from(client, data_key, durable)
    if not keep:
        return 0
    # exact trim (not "~"): ids below keep-1 go, so the entry starting at keep stays
    return client.xtrim(data_key, minid=keys.entry_id(keep), approximate=False)


def check_settings(budget_bytes, hard_limit_bytes, closed_ttl_s, inactive_ttl_s,
                   interval_s) -> None:
    """ValueError naming the first setting that would make the tracker destroy data (or
    spin): a budget <= 0, a hard limit below the budget, a TTL <= 0, an interval <= 0."""
    if budget_bytes <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget_bytes}")
    if hard_limit_bytes < budget_bytes:
        raise ValueError(f"hard limit ({hard_limit_bytes} bytes) must not be below the budget "
                         f"({budget_bytes} bytes): above it, points no file holds are trimmed")
    for name, value in (("closed TTL", closed_ttl_s), ("inactive TTL", inactive_ttl_s),
                        ("interval", interval_s)):
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} must be > 0 s, got {value}")


class MemoryTracker:
    def __init__(self, store: DataStore | str, budget_bytes: int = 1024 * MB,
                 hard_limit_bytes: int | None = None, closed_ttl_s: float = 7 * 24 * 3600,
                 inactive_ttl_s: float = 24 * 3600, interval_s: float = 1.0,
                 orphan_interval_s: float = 60.0):
        budget = int(budget_bytes)
        hard_limit = int(budget * 1.5 if hard_limit_bytes is None else hard_limit_bytes)
        check_settings(budget, hard_limit, closed_ttl_s, inactive_ttl_s, interval_s)
        self.store = DataStore(store) if isinstance(store, str) else store
        self.redis = self.store.redis
        self.budget = budget
        self.hard_limit = hard_limit
        self.closed_ttl_s = closed_ttl_s
        self.inactive_ttl_s = inactive_ttl_s
        self.interval_s = interval_s
        self.orphan_interval_s = orphan_interval_s
        self._next_orphan_sweep = 0.0  # monotonic time
        self._activity: dict[str, tuple] = {}  # scan key -> (fingerprint, since)
        self._stop = threading.Event()
        # trims of points no file held yet, and those points (for metrics and tests)
        self.lost_trims = 0
        self.lost_points = 0
        self.metrics = None  # TrackerMetrics when served (--metrics-port)

    def used_memory(self) -> int:
        return self.store.used_memory()

    def memory_without_scan_data(self, used: int | None = None) -> int:
        """What Redis would use with every scan's data trimmed (its own needs, other keys):
        used_memory less the memory of the scans' data streams. A hard limit below it
        trims every point of every scan before any writer can store it. (On a cluster:
        the fullest primary's usage less every scan's data, a lower bound.)"""
        used = self.used_memory() if used is None else used
        data_keys = []
        for key in self._scans_oldest_first():
            raw = self.redis.hget(key, "streams")
            data_keys += [keys.data_key(key, n) for n in (json.loads(raw) if raw else {})]
        if not data_keys:
            return used
        pipe = self.redis.pipeline(transaction=False)
        for data_key in data_keys:  # one by one: a cluster pipeline sends each to its node
            pipe.memory_usage(data_key)
        return max(0, used - sum(int(n or 0) for n in pipe.execute()))

    def check_hard_limit(self) -> str | None:
        """Whether the hard limit leaves room for scans: a problem in words (the limit is
        below what Redis uses with no scan data: everything would be lost), or None. Also
        says, as an ERROR log line and in the metrics, when Redis is above the hard limit
        now (points no file holds will be trimmed at once)."""
        used = self.used_memory()
        if self.metrics is not None:
            self.metrics.observe(self, used)
        if used <= self.hard_limit:
            return None
        floor = self.memory_without_scan_data(used)
        if floor >= self.hard_limit:
            return (f"hard limit {self.hard_limit / MB:.1f} MB is below what Redis at "
                    f"{self.store.url} uses with no scan data ({floor / MB:.1f} MB of "
                    f"{used / MB:.1f} MB): every point of every scan would be trimmed before "
                    f"a writer could store it; give a hard limit (and budget) well above "
                    f"{floor / MB:.1f} MB")
        log.error("Redis at %s uses %.1f MB, above the hard limit (%.1f MB): points no file "
                  "holds yet are trimmed now and LOST", self.store.url, used / MB,
                  self.hard_limit / MB)
        return None

    # ---- one round -------------------------------------------------------------------------
    def step(self) -> dict:
        """One round; returns what it did (for logs and tests)."""
        done = {"trimmed_entries": 0, "lost_points": 0, "expired": 0, "deleted": 0,
                "orphan_keys": 0}
        scans = self._scans_oldest_first()
        if self.used_memory() > self.budget:
            for key in scans:
                done["trimmed_entries"] += self._trim_scan(key, beyond_watermark=False)
                if self.used_memory() <= self.budget:
                    break
        if self.used_memory() > self.hard_limit:
            for key in scans:
                lost = self._trim_scan(key, beyond_watermark=True)
                done["lost_points"] += lost
                if self.used_memory() <= self.hard_limit:
                    break
        self._expire_and_clean(scans, done)
        if time.monotonic() >= self._next_orphan_sweep:
            done["orphan_keys"] = self.remove_orphans()
            self._next_orphan_sweep = time.monotonic() + self.orphan_interval_s
        if self.metrics is not None:
            self.metrics.observe(self, self.used_memory())
        return done

    def remove_orphans(self) -> int:
        """Remove every key of a scan whose hash no longer exists; the number removed.
        One SCAN of the keyspace (incremental, so Redis is not blocked)."""
        by_scan: dict[str, list] = {}
        for raw in self.redis.scan_iter(match="blissdata:scan:{*}:*", count=1000):
            key = raw.decode()
            scan_key = key[:key.index("}") + 1]
            by_scan.setdefault(scan_key, []).append(key)
        removed = 0
        for scan_key, found in by_scan.items():
            if self.redis.exists(scan_key):
                continue
            n = int(self.redis.eval(_REMOVE_ORPHANS, 1 + len(found), scan_key, *found))
            if n:
                log.warning("scan %s no longer exists: removed %d keys left behind (%s)",
                            scan_key, n, ", ".join(k[len(scan_key):] for k in found))
            removed += n
        return removed

    def _scans_oldest_first(self) -> list[str]:
        return [k.decode() for k in self.redis.zrange(keys.INDEX_ALL, 0, -1)]

    def _streams(self, key: str) -> tuple[dict, dict, bool]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(key, "streams")
        pipe.hget(key, "info")
        pipe.hgetall(keys.durable_key(key))
        streams, info, durable = pipe.execute()
        definitions = json.loads(streams) if streams else {}
        save = json.loads(info).get("save", True) if info else True
        return definitions, {k.decode(): json.loads(v)["points"] for k, v in durable.items()}, \
            save is not False

    def _first_available(self, data_key: str) -> int | None:
        first = self.redis.xrange(data_key, "-", "+", count=1)
        return keys.first_index(first[0][0]) if first else None

    def _trim_scan(self, key: str, beyond_watermark: bool) -> int:
        """Trim one scan's streams; entries removed, or (beyond_watermark) points lost."""
        definitions, durable, save = self._streams(key)
        total = 0
        for name in definitions:
            data_key = keys.data_key(key, name)
            # everything but the last entry, or what the writer's file holds
            upto = 2**62 if beyond_watermark or not save else durable.get(name, 0)
            keep = keep_from(self.redis, data_key, upto)
            first = self._first_available(data_key)
            if keep is None or first is None or keep <= first:
                continue
            # exact trim (not "~"): ids below keep-1 go, so entry [keep, ...) stays
            removed = self.redis.xtrim(data_key, minid=keys.entry_id(keep), approximate=False)
            if beyond_watermark:
                lost_from = max(first, durable.get(name, 0) if save else keep)
                if save and keep > lost_from:
                    self._record_lost(key, name, lost_from, keep)
                    total += keep - lost_from
            else:
                total += removed
        return total

    def _record_lost(self, key: str, name: str, start: int, stop: int) -> None:
        lost_points.record(self.redis, key, name, start, stop, self.store.script_flags())
        self.lost_trims += 1
        self.lost_points += stop - start
        if self.metrics is not None:
            self.metrics.lost(stop - start)
        log.error("Redis over its hard limit (%d MB): scan %s stream %r points [%d, %d) "
                  "trimmed before any file held them: LOST", self.hard_limit // MB, key, name,
                  start, stop)

    def _expire_and_clean(self, scans: list[str], done: dict) -> None:
        now = time.monotonic()
        for key in scans:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hget(key, "state")
            pipe.ttl(key)
            pipe.hget(key, "streams")
            pipe.hget(key, "identity")
            state, ttl, streams, identity = pipe.execute()
            if state is None:  # gone (expired or deleted elsewhere): clean the index
                self.redis.zrem(keys.INDEX_ALL, key)
                if identity is None:
                    for index in self.redis.scan_iter(match="blissdata:index:session:*"):
                        self.redis.zrem(index, key)
                self._activity.pop(key, None)
                continue
            names = list(json.loads(streams)) if streams else []
            scan_keys = [key, keys.state_key(key), keys.durable_key(key), keys.lost_key(key),
                         keys.writer_key(key)] + [keys.data_key(key, n) for n in names]
            if state == b"CLOSED":
                if ttl == -1:
                    pipe = self.redis.pipeline(transaction=False)
                    for k in scan_keys:
                        pipe.expire(k, max(1, int(self.closed_ttl_s)))
                    pipe.execute()
                    done["expired"] += 1
                continue
            fingerprint = (state, self._lengths(scan_keys[5:]))
            seen = self._activity.get(key)
            if seen is None or seen[0] != fingerprint:
                self._activity[key] = (fingerprint, now)
            elif now - seen[1] > self.inactive_ttl_s:
                log.warning("scan %s inactive for %.0f s: deleted", key, now - seen[1])
                try:
                    self.store.delete_scan(key)
                except Exception as exc:  # deleted meanwhile
                    log.info("scan %s: %s", key, exc)
                self._activity.pop(key, None)
                done["deleted"] += 1

    def _lengths(self, data_keys: list[str]) -> tuple:
        pipe = self.redis.pipeline(transaction=False)
        for k in data_keys:
            pipe.xrevrange(k, "+", "-", count=1)
        return tuple(r[0][0] if r else None for r in pipe.execute())

    # ---- service ---------------------------------------------------------------------------
    def run(self) -> None:
        log.info("memory tracker on %s: budget %d MB, hard limit %d MB", self.store.masked_url,
                 self.budget // MB, self.hard_limit // MB)
        try:
            problem = self.check_hard_limit()
        except (redis.ConnectionError, redis.TimeoutError):
            problem = None  # Redis not there yet: the rounds below say so and retry
        if problem:  # the command refuses to start; here (a program's own tracker), said loudly
            log.error("%s", problem)
        pause = self.interval_s
        while not self._stop.is_set():
            try:
                done = self.step()
                if done["trimmed_entries"] or done["expired"] or done["deleted"]:
                    log.info("round: %s, used %d MB", done, self.used_memory() // MB)
                pause = self.interval_s
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting or gone: try again, less and less often (at most 30 s)
                pause = min(30.0, max(pause * 2, self.interval_s))
                log.warning("Redis at %s unreachable: %s; next try in %.0f s",
                            self.store.masked_url, exc, pause)
            self._stop.wait(pause)

    def stop(self) -> None:
        self._stop.set()


# Shortest TTLs the command accepts: a scan waiting longer than --inactive-ttl between two
# points is deleted, a closed scan older than --closed-ttl expires even if no file holds it.
MIN_TTL_S = 60.0


def _cli_problem(args) -> str | None:
    """What is wrong with the command line's settings, in its own terms (MB, options)."""
    if not args.budget > 0:
        return f"--budget {args.budget:g}: must be > 0 MB"
    if args.hard_limit is not None and not args.hard_limit >= args.budget:
        return (f"--hard-limit {args.hard_limit:g} MB is below --budget {args.budget:g} MB: "
                f"it must be at least the budget")
    for option, value in (("--closed-ttl", args.closed_ttl),
                          ("--inactive-ttl", args.inactive_ttl)):
        if not value >= MIN_TTL_S:
            return (f"{option} {value:g}: must be at least {MIN_TTL_S:.0f} s (shorter deletes "
                    f"scans still in use, or before the writer has them on disk)")
    if not args.interval > 0:
        return f"--interval {args.interval:g}: must be > 0 s"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blissdata-memory-tracker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", metavar="URL",
                        help="Redis URL (default: REDIS_URL, then redis://127.0.0.1:6379)")
    parser.add_argument("--budget", type=float, default=1024, metavar="MB",
                        help="above it, points already in a file are trimmed "
                             "(default: 1024)")
    parser.add_argument("--hard-limit", type=float, metavar="MB",
                        help="at least the budget; above it, points no file holds yet are "
                             "trimmed and recorded as lost (default: 1.5 x budget)")
    parser.add_argument("--closed-ttl", type=float, default=7 * 24 * 3600, metavar="S",
                        help=f"seconds a closed scan stays in Redis, at least {MIN_TTL_S:.0f} "
                             f"(default: 604800 = 7 days)")
    parser.add_argument("--inactive-ttl", type=float, default=24 * 3600, metavar="S",
                        help=f"seconds without a new point or state change after which an "
                             f"open scan is deleted, at least {MIN_TTL_S:.0f} "
                             f"(default: 86400 = 1 day)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="S",
                        help="seconds between rounds, > 0 (default: 1)")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on this port (127.0.0.1): memory, "
                             "limits, trims of points no file held (default: none)")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: INFO)")
    args = parser.parse_args(argv)
    problem = _cli_problem(args)
    if problem:
        parser.error(problem)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = url_from(args.redis)
    try:
        tracker = MemoryTracker(url, int(args.budget * MB),
                                None if args.hard_limit is None else int(args.hard_limit * MB),
                                args.closed_ttl, args.inactive_ttl, args.interval)
    except ConnectionError as exc:
        print(f"blissdata-memory-tracker: {exc}", file=sys.stderr)
        return 1
    if args.metrics_port is not None:
        from .tracker_metrics import TrackerMetrics

        try:
            tracker.metrics = TrackerMetrics(args.metrics_port)
        except OSError as exc:
            print(f"blissdata-memory-tracker: metrics cannot listen on 127.0.0.1:"
                  f"{args.metrics_port}: {exc}", file=sys.stderr)
            return 1
    problem = tracker.check_hard_limit()
    if problem:
        print(f"blissdata-memory-tracker: not started: {problem} (--hard-limit; default "
              f"1.5 x --budget)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: tracker.stop())
    signal.signal(signal.SIGINT, lambda *_: tracker.stop())
    tracker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
