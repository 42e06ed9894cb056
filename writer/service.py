"""The writer service: follows new scans of the configured sessions, one ScanWriter each."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import redis
import tenacity

from blissdata import DataStore, NoScanAvailable, keys

from . import status as writer_status
from .config import WriterConfig
from .files import OpenFiles
from .metrics import WriterMetrics
from .scan_writer import ScanWriter

log = logging.getLogger("blisswriter")


class WriterService:
    def __init__(self, config: WriterConfig):
        self.config = config
        # big socket reads: frames arrive in MiB-sized entries
        self.store = DataStore(config.redis_url, socket_read_size=1 << 20)
        self.redis = self.store.redis
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
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

    # ---- scans -----------------------------------------------------------------------
    def wants(self, session: str) -> bool:
        return not self.config.sessions or session in self.config.sessions

    def start_scan(self, scan_key: str) -> None:
        with self._writers_lock:
            if scan_key in self.writers or self._stop.is_set():
                return
            writer = ScanWriter(self, scan_key)
            self.writers[scan_key] = writer
            self.metrics.scans_active.set(len(self.writers))
        writer.start()

    def scan_finished(self, writer: ScanWriter) -> None:
        with self._writers_lock:
            self.writers.pop(writer.scan_key, None)
            self.metrics.scans_active.set(len(self.writers))
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

    def active_scans(self) -> int:
        return max(1, len(self.writers))

    def resume_unfinished(self) -> int:
        """Start a writer for every listed scan whose writing is not done or failed: those a
        crash interrupted and those created while the service was down."""
        started = 0
        sessions = self.config.sessions or [None]
        for session in sessions:
            for key in self.store.search_scans(session=session):
                previous = writer_status.read(self.redis, key)
                if previous is not None and previous.finished:
                    continue
                self.start_scan(key)
                started += 1
        return started

    # ---- main loop -------------------------------------------------------------------
    def run(self) -> None:
        """Follow new scans until stop() (or SIGTERM/SIGINT via the CLI)."""
        log.info("blisswriter %s following %s on %s, data roots %s", self.identity,
                 self.config.sessions or "every session", self.config.redis_url,
                 self.config.data_roots)
        since = None
        for attempt in self._retrying():
            with attempt:
                since = self._current_end()
                resumed = self.resume_unfinished()
                if resumed:
                    log.info("resuming %d unfinished scan(s)", resumed)
        last_memory_check = 0.0
        while not self._stop.is_set():
            if time.monotonic() - last_memory_check > 5:
                last_memory_check = time.monotonic()
                try:
                    self.metrics.redis_memory.set(self.redis.info("memory")["used_memory"])
                except redis.RedisError:
                    pass
            try:
                found_at, key = self.store.get_next_scan(since=since, timeout=0.5)
                identity = self.redis.hget(key, "identity")
                since = found_at  # only once it is handled: a lost Redis retries this scan
            except NoScanAvailable:
                continue
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # lost for the whole wait (the store retried meanwhile): keep following
                log.warning("Redis at %s unreachable (%s); retrying", self.config.redis_url, exc)
                self._stop.wait(1.0)
                continue
            if identity is not None and self.wants(json.loads(identity)["session"]):
                self.start_scan(key)
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
        self.metrics.stop()
        if self.pool is not None:
            self.pool.shutdown()
        log.info("blisswriter stopped")
