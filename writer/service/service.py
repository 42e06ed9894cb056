"""The writer service: follows new scans of the configured sessions, one ScanWriter each."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import tenacity

from blissdata import DataStore, NoScanAvailable, RedisUnreachableError, keys
from blissdata.redis_url import masked

from ..hdf5.files import OpenFiles
from ..hdf5.paths import PathRefused, scan_file_path
from ..scan.scan_writer import ScanWriter
from ..state import status as writer_status
from ..state.pool import WriterPool, read_writers
from .config import WriterConfig
from .metrics import WriterMetrics

log = logging.getLogger("blisswriter")


PROTOCOLS = ("native", "blissdata2")  # blissdata2: scans of ESRF's blissdata 2.x (BLISS)


class WriterService:
    def __init__(self, config: WriterConfig, protocols=None):
        self.config = config
        protocols = config.protocols if protocols is None else protocols
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown or not protocols:
            raise ValueError(f"protocols {sorted(unknown) or '(none)'}: each must be one of "
                             f"{', '.join(PROTOCOLS)}")
        self.protocols = tuple(protocols)
        self.store = self._connect()
        self.redis = self.store.redis
        if "blissdata2" in self.protocols:  # else it would wait, silent, for scans never to come
            from ..protocols.blissdata2.protocol import check_modules

            check_modules(self.redis, self.store.masked_url)
        # leases shared with the other writers of these sessions (writer/state/pool.py)
        self.writer_pool = WriterPool(self.redis, config.lease_ttl_s, config.sessions,
                                      allow_oom=self.store.script_flags())
        self.identity = self.writer_pool.id  # host:pid
        self.pool = (ThreadPoolExecutor(config.compression_threads, "compress")
                     if config.compression_threads > 0 else None)
        self.files = OpenFiles()
        self.metrics = WriterMetrics()
        if config.metrics.get("enabled"):
            self.metrics.serve(int(config.metrics.get("port", 9118)),
                               config.metrics.get("host", "127.0.0.1"))
        self.writers: dict[str, ScanWriter] = {}
        self._writers_lock = threading.Lock()
        self._stop = threading.Event()
        self._lag_labels: set[str] = set()
        self._not_wanted: set[str] = set()  # scans of sessions this writer does not follow
        self._claims: dict[str, float] = {}  # new scan key -> when to try to take it

    def _connect(self) -> DataStore:
        """The store; a Redis unreachable at start is waited for (config.wait_for_redis) as
        one lost later is: the same backoff and log lines, for ever (Ctrl-C, SIGTERM end it)."""
        while True:
            try:  # big socket reads: frames arrive in MiB-sized entries
                return DataStore(self.config.redis_url, socket_read_size=1 << 20,
                                 wait_for_redis=self.config.wait_for_redis)
            except RedisUnreachableError as exc:
                if not self.config.wait_for_redis:
                    raise
                log.warning("Redis at %s unreachable (%s); retrying",
                            masked(self.config.redis_url), exc)

    # ---- scans -----------------------------------------------------------------------
    def wants(self, session: str) -> bool:
        return not self.config.sessions or session in self.config.sessions

    def claim(self, scan_key: str, now: bool = False) -> bool:
        """Take the scan if no other writer has it (leases of its file and of the scan) and
        start writing it; False if it is not for us or someone else has it. Unless `now`
        or the file is ours already, a busy writer leaves a new scan to idle ones for a
        while (longer the more scans it writes)."""
        if scan_key in self.writers or scan_key in self._not_wanted or self._stop.is_set():
            return False
        raw = self.redis.hget(scan_key, "identity")
        if raw is None:  # deleted
            self.writer_pool.finished(scan_key)
            return False
        identity = json.loads(raw)
        if not self.wants(identity["session"]):
            self._not_wanted.add(scan_key)
            return False
        try:
            path = str(scan_file_path(identity["path"], identity["number"],
                                      self.config.file_layout, self.config.data_roots))
        except PathRefused:  # whoever takes it fails it, saying why
            path = identity["path"]
        first_seen = self._claims.setdefault(scan_key, time.monotonic())
        if not (now or path in self.writer_pool.files
                or time.monotonic() >= first_seen + self._claim_delay()):
            return False
        if self.writer_pool.acquire(scan_key, path) is None:
            return False
        self._claims.pop(scan_key, None)
        previous = writer_status.read(self.redis, scan_key)
        if previous is not None and previous.finished:
            self.writer_pool.release(scan_key)
            self.writer_pool.finished(scan_key)
            return False
        if previous is not None and previous.state == "writing" and \
                previous.writer != self.identity:
            self.writer_pool.takeover_count += 1
            self.metrics.takeovers.inc()
            log.info("scan %s: taking it over from writer %s", scan_key, previous.writer)
        return self.start_scan(scan_key)

    def start_scan(self, scan_key: str, writer_class=ScanWriter) -> bool:
        """Start writing a scan whose lease this writer holds (claim() takes it)."""
        with self._writers_lock:
            if scan_key in self.writers or self._stop.is_set():
                self.writer_pool.release(scan_key)
                return False
            writer = writer_class(self, scan_key)
            self.writers[scan_key] = writer
            self.metrics.scans_active.set(len(self.writers))
            self.metrics.scans_held.set(len(self.writer_pool.scans))
        writer.start()
        return True

    def scan_finished(self, writer: ScanWriter) -> None:
        with self._writers_lock:
            self.writers.pop(writer.scan_key, None)
            self.metrics.scans_active.set(len(self.writers))
        try:
            if writer.status.finished and writer.lease.holds():
                self.writer_pool.finished(writer.scan_key)
        except redis.RedisError as exc:  # stays listed: a writer sees it is done and skips
            log.warning("scan %s: not taken off the unfinished list: %s", writer.scan_key, exc)
        self.writer_pool.release(writer.scan_key)
        self.metrics.scans_held.set(len(self.writer_pool.scans))
        self.metrics.scans_finished.labels(writer.status.state).inc()
        if writer.scan_key in self._lag_labels:
            self._lag_labels.discard(writer.scan_key)
            self.metrics.lag_points.remove(writer.scan_key)

    def record_flush(self, scan_key: str, new_points: int, new_bytes: int, lag: int) -> None:
        """Called by a ScanWriter after each flush."""
        self.metrics.points.inc(max(0, new_points))
        self.metrics.bytes.inc(max(0, new_bytes))
        self.metrics.lag_points.labels(scan_key).set(lag)
        self._lag_labels.add(scan_key)

    def record_lost(self, scan_key: str, points: int) -> None:
        """Called by a ScanWriter that found points trimmed from Redis before it stored
        them (a gap it filled)."""
        self.metrics.gaps.inc()
        self.metrics.points_lost.inc(points)

    def record_gone(self, scan_key: str) -> None:
        """Called by a ScanWriter whose scan vanished from Redis while it wrote it."""
        self.metrics.scans_gone.inc()

    def active_scans(self) -> int:
        return max(1, len(self.writers))

    def resume_unfinished(self) -> int:
        """List every indexed scan whose writing is not done or failed (those a crash
        interrupted and those created while no writer ran) as unfinished, for the writers
        of the pool to take; returns how many this one took."""
        started = 0
        sessions = self.config.sessions or [None]
        for session in sessions:
            for key in self.store.search_scans(session=session):
                previous = writer_status.read(self.redis, key)
                if previous is not None and previous.finished:
                    continue
                self.writer_pool.offer(key)
                started += self.claim(key)
        return started

    def _sweep(self) -> None:
        """Take the unfinished scans nobody holds: new ones, and those of a writer that
        stopped renewing its leases."""
        candidates = self.writer_pool.candidates()
        for key in set(self._claims) - set(candidates):
            del self._claims[key]  # another writer took it
        for key in candidates:
            try:
                self.claim(key)
            except (ValueError, KeyError, TypeError) as exc:  # not a scan we can read
                log.error("scan %s: not taken, its header cannot be read: %s", key, exc)
                self._not_wanted.add(key)

    def _claim_delay(self) -> float:
        return min(1.0, 0.1 * len(self.writers))

    def _publish_pool_metrics(self) -> None:
        writers = read_writers(self.redis)
        self.metrics.writers_alive.set(sum(w["alive"] for w in writers))
        self.metrics.scans_held.set(len(self.writer_pool.scans))
        self.metrics.leases_lost.set(self.writer_pool.lost_count)

    # ---- main loop -------------------------------------------------------------------
    def run(self) -> None:
        """Follow new scans until stop() (or SIGTERM/SIGINT via the CLI)."""
        log.info("blisswriter %s following %s on %s, data roots %s", self.identity,
                 self.config.sessions or "every session", self.store.masked_url,
                 self.config.data_roots)
        since = None
        for attempt in self._retrying():
            with attempt:
                self.writer_pool.start()
                if "native" in self.protocols:
                    since = self._current_end()
                    resumed = self.resume_unfinished()
                    if resumed:
                        log.info("resuming %d unfinished scan(s)", resumed)
        if "blissdata2" in self.protocols:
            from ..protocols.blissdata2.follower import Bliss2Follower

            Bliss2Follower(self, self._stop).start()
        if "native" not in self.protocols:
            self._stop.wait()
            self._shutdown()
            return
        last_memory_check = last_sweep = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_memory_check > 5:
                last_memory_check = time.monotonic()
                try:
                    self.metrics.redis_memory.set(self.store.used_memory())
                    self._publish_pool_metrics()
                except redis.RedisError:
                    pass
            try:
                # new scans left to idle writers: look again soon whether one took them
                every = 0.1 if self._claims else self.writer_pool.sweep_s
                if time.monotonic() - last_sweep >= every:
                    last_sweep = time.monotonic()
                    self._sweep()
                found_at, key = self.store.get_next_scan(since=since, timeout=min(0.5, every))
                identity = self.redis.hget(key, "identity")
                if identity is not None and self.wants(json.loads(identity)["session"]):
                    self.writer_pool.offer(key)  # for this writer or another one to take
                    self.claim(key)
                since = found_at  # only once it is handled: a lost Redis retries this scan
            except NoScanAvailable:
                continue
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # lost for the whole wait (the store retried meanwhile): keep following
                log.warning("Redis at %s unreachable (%s); retrying", self.store.masked_url, exc)
                self._stop.wait(1.0)
                continue
        self._shutdown()

    def _current_end(self) -> str:
        last = self.redis.xrevrange(keys.SCANS_STREAM, "+", "-", count=1)
        return last[0][0].decode() if last else "0-0"

    def _retrying(self):
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5),
            stop=tenacity.stop_when_event_set(self._stop), reraise=True,
            before_sleep=lambda s: log.warning("Redis unreachable: %s", s.outcome.exception()))

    def stop(self) -> None:
        self._stop.set()

    def _shutdown(self) -> None:
        with self._writers_lock:
            writers = list(self.writers.values())
        for writer in writers:
            writer.stop()
        for writer in writers:
            writer.join(30)
        self.files.close_all()
        self.writer_pool.stop()
        self.metrics.stop()
        if self.pool is not None:
            self.pool.shutdown()
        log.info("blisswriter stopped")
