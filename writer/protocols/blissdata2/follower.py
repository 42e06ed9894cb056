"""Following ``_SCAN_HISTORY_``: one Bliss2ScanWriter per scan of the wanted sessions."""

from __future__ import annotations

import json
import logging
import threading
import time

import redis

from blissdata import ScanState

from ...state import status as writer_status
from ...state.pool import UNFINISHED_BLISS2
from .protocol import DELETED_TTL_S, SCAN_HISTORY
from .writer import Bliss2ScanWriter

log = logging.getLogger("blisswriter")


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
        it (the same scan and file leases as native scans; writer/state/pool.py). The scan is
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
