"""The pump of one scan: reads its streams' events (a cursor, read ahead), appends them to the
entry's datasets, flushes within ``max_lag_s``, keeps room on the disk, fills the gaps of
points lost in Redis, then publishes the durable watermarks and trims a full Redis.

The scan's life (``scan_writer.ScanWriter``) owns the thread and calls `Pump.stream()` once
the entry (``entry.ScanEntry``) has made its datasets; `flush()` and `mark_durable()` also
serve it when the scan pauses or fails.
"""

from __future__ import annotations

import errno
import logging
import os
import time

import numpy as np
import redis

from blissdata import bslz4, lost_points
from blissdata.exceptions import MalformedEntryError, PointsGoneError
from blissdata.encoding import StreamDefinition
from blissdata.memory_tracker import trim_durable
from blissdata.stream import Stream

from ..state import status as writer_status
from .errors import ScanFailed
from .read_ahead import ReadAhead

log = logging.getLogger("blisswriter")
READ_BYTES = 16 * 2**20  # target size of one read per stream
GATHER_BYTES = 4 * 2**20  # a read that brought less waits read_gather_s before the next
FILL_BYTES = 64 * 2**20  # a gap of lost points is filled at most this much at a time


def _nbytes(part) -> int:
    """Memory held by one piece a cursor read: an array, or a list of points or chunks."""
    if isinstance(part, np.ndarray):
        return part.nbytes
    return sum(len(p) if isinstance(p, (bytes, bytearray)) else getattr(p, "nbytes", 256)
               for p in part)


def _small(views: dict) -> bool:
    """A read that brought little: most of its cost was per stream, not per byte."""
    return sum(_nbytes(part) for view in views.values() for part in view.parts) < GATHER_BYTES


def _fill_batch(definition: StreamDefinition) -> int:
    return max(1, FILL_BYTES // max(1, definition.point_nbytes or 1))


def _filler(appender, definition: StreamDefinition, n: int):
    """n points that stand for lost ones, in the form the cursor gives this stream."""
    if definition.encoding == "json":
        return [None] * n
    shape = tuple(0 if d == -1 else d for d in definition.shape)
    fill = appender.dataset.fillvalue
    if definition.varying:  # empty points (their shapes say so)
        return [np.zeros(shape, definition.dtype)] * n
    if definition.encoding == "bslz4":  # raw chunks: one compressed frame, n times
        frame = np.full(shape, fill, definition.dtype)
        return [bslz4.compress(frame)] * n
    return np.full((n, *shape), fill, definition.dtype)


class Pump:
    """Events of one scan into its file, and its durable watermarks out to Redis.

    A protocol whose watermarks live elsewhere (writer/protocols/blissdata2/) overrides
    `mark_durable`, `_published` and `_trimmable`.
    """

    def __init__(self, service, scan_key: str, lease, status, scan_entry, *, name: str,
                 check_scan, event, idle_flush_after_s, idle_flush_bytes: int,
                 read_gather_s: float):
        """`scan_entry`: the file and datasets appended to; `check_scan()` between reads and
        `event()` when events come: the scan's life, told; the rest: ScanWriter's knobs."""
        self.service = service
        self.config = service.config
        self.scan_key = scan_key
        self.lease = lease
        self.status = status
        self.scan = None  # the scan being written (the writer sets it at each attempt)
        self.scan_entry = scan_entry
        self.name = name  # the writer's thread (its reader is "read-" + name)
        self._check_scan = check_scan
        self._event = event
        self.idle_flush_after_s = idle_flush_after_s
        self.idle_flush_bytes = idle_flush_bytes
        self.read_gather_s = read_gather_s
        self._largest_entry = 0  # bytes of the largest Redis entry read (sizes the reads)
        self._redefined_at = None  # stream name -> points published when seen redefined

    # the datasets of the entry: filled when it opens, emptied when it is released
    @property
    def appenders(self) -> dict:
        return self.scan_entry.datasets.appenders

    @property
    def definitions(self) -> dict:
        return self.scan_entry.datasets.definitions

    @property
    def dataset_paths(self) -> dict:
        return self.scan_entry.datasets.dataset_paths

    @property
    def file(self):
        """The scan's open file (its entry opens and releases it)."""
        return self.scan_entry.file

    @property
    def file_path(self):
        return self.scan_entry.file_path

    @property
    def where(self) -> str:
        return self.scan_entry.where

    # ---- the data loop ---------------------------------------------------------------
    def stream(self) -> None:
        """Read, append and flush until every stream is sealed and in the file (the writer
        calls it once the entry has its appenders)."""
        names = list(self.appenders)
        half_lag = self.config.max_lag_s / 2
        gather_s = min(self.read_gather_s, half_lag / 10)

        def read_ahead():  # from where each appender is
            cursor = self.scan.cursor(names, raw_chunks=True,
                                      start={n: a.npoints for n, a in self.appenders.items()})
            return ReadAhead(cursor, lambda: self._entries_per_read(len(names)),
                             name=f"read-{self.name}",
                             gather=lambda views: gather_s if _small(views) else 0.0)

        ahead = read_ahead()
        last_state_check = 0.0
        dirty_since = None  # when the oldest point not flushed yet was read
        last_flush = time.monotonic()
        flush_s = 0.0  # what the last flush took: it comes out of the lag too
        unflushed_bytes = 0  # read since the last flush
        try:
            while not ahead.ended:
                # A flush costs about the same for one point as for many: flush when the
                # oldest point read has waited half the lag (points read within the other
                # half are durable within max_lag_s), or when memory asks for it; at a
                # pause of the producer only once idle_flush_bytes came (a 10 Hz scan pauses
                # after every point: a few bytes each).
                due = half_lag - flush_s - gather_s  # a point may wait gather_s to be read
                wait = 0.1 if dirty_since is None else \
                    max(0.0, dirty_since + due - time.monotonic())
                big = unflushed_bytes >= self.idle_flush_bytes
                if dirty_since is not None and (big or self.idle_flush_after_s is not None):
                    # a short wait tells "the producer paused" (longer than the reader's own
                    # pause after a small read)
                    wait = min(wait, gather_s + 0.02)
                try:
                    views = ahead.get(timeout=min(wait, 0.1, half_lag))
                except MalformedEntryError:
                    self.scan.update(block=False)
                    self.check_definitions(final=True)  # a redefinition explains it
                    raise
                except PointsGoneError as gone:  # trimmed before we stored them: lost
                    ahead.close()
                    self._fill_gap(gone)
                    dirty_since = time.monotonic() if dirty_since is None else dirty_since
                    ahead = read_ahead()  # on from the points after the gap
                    continue
                now = time.monotonic()
                if views:
                    self._event()
                    incoming = sum(_nbytes(part) for view in views.values()
                                   for part in view.parts)
                    self._check_disk_room(incoming)
                    unflushed_bytes += incoming
                    with self.file.lock:
                        self.lease.check()
                        for name, view in views.items():
                            self._append(name, view)
                    dirty_since = now if dirty_since is None else dirty_since
                # a pause of the producer (a protocol that asks for it), not too soon
                idle = not views and (unflushed_bytes >= self.idle_flush_bytes or (
                    self.idle_flush_after_s is not None
                    and now - last_flush >= self.idle_flush_after_s))
                if dirty_since is not None and (idle or now - dirty_since >= due
                                                or self._over_budget()):
                    # not published (Redis full): again within half a lag
                    dirty_since = None if self.flush() else time.monotonic()
                    flush_s = min(time.monotonic() - now, half_lag / 2)
                    last_flush, unflushed_bytes = now, 0
                if now - last_state_check > 0.5:
                    last_state_check = now
                    self._check_scan()
        finally:
            ahead.close()
        while not self.flush(final=True):  # last chunks compressed; Redis full: retry
            self._check_scan()
            time.sleep(0.1)
        self.check_definitions(final=True)

    def _entries_per_read(self, n_streams: int) -> int:
        """Redis entries read per stream per call, so the reads alive at once (one being
        written, two read ahead) fit in this scan's share of the memory budget. Entries are
        at most max_event_bytes; once some have come, the largest seen is the measure."""
        share = self.config.memory_budget_bytes // max(1, self.service.active_scans())
        entry_bytes = self._largest_entry or self.service.store.max_event_bytes
        # ~16 MiB per reply is enough to make the per-call cost vanish; bigger replies
        # only swell Redis's output buffer
        per_stream = min(share // 3 // max(1, n_streams), READ_BYTES) // max(1, entry_bytes)
        return int(max(1, min(256, per_stream)))

    def _check_disk_room(self, incoming: int) -> None:
        """Fail the scan while its disk still has room for HDF5 to record that cleanly: a
        write cut short by a full disk can leave the file's metadata half-flushed and the
        points already there unreadable. The room for the writes ahead plus
        ``disk_reserve_mb`` is allocated beyond the file's end (other programs cannot take
        it); where the file system cannot do that, its free space is checked instead."""
        reserve = self.config.disk_reserve_bytes
        if not reserve:  # 0: the check is off
            return
        need = incoming + sum(a.pending_bytes for a in self.appenders.values()) + reserve
        why = (f"and the writer keeps {self.config.disk_reserve_mb:g} MB for the file "
               f"(disk_reserve_mb) so that it stays readable")
        try:
            if self.file.reserve(need):
                return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ScanFailed(f"disk full: no room for the next {need / 1e6:.1f} MB of "
                             f"{self.where}, {why}") from None
        folder = self.file_path.parent
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < need:
            raise ScanFailed(f"disk full: {free / 1e6:.1f} MB left in {folder}, {why}")

    def _over_budget(self) -> bool:
        pending = sum(a.pending_bytes for a in self.appenders.values())
        return pending > self.config.memory_budget_bytes // max(1, self.service.active_scans())

    def _append(self, name: str, view) -> None:
        appender = self.appenders[name]
        if view.index != appender.npoints:
            raise ScanFailed(f"stream {name!r}: got points from {view.index}, expected "
                             f"{appender.npoints} (lost or duplicated data)")
        self._largest_entry = max(self._largest_entry, view.entry_nbytes)
        self._append_parts(name, view.index, view.parts)

    def _append_parts(self, name: str, index: int, parts) -> None:
        appender = self.appenders[name]
        definition = self.definitions[name]
        try:
            for part in parts:  # as the cursor cut them: no copy to join them
                if definition.encoding == "bslz4":
                    appender.append_compressed(part)
                elif definition.varying:
                    appender.append_varying(part)
                else:  # numeric arrays, or lists of json / reference points
                    appender.append(part)
        except ValueError as exc:
            raise ScanFailed(f"stream {name!r} at point {index}: {exc}") from None

    # ---- points lost in Redis --------------------------------------------------------
    def _fill_gap(self, gone: PointsGoneError) -> None:
        """Points [start, stop) of a stream were trimmed from Redis before this writer
        stored them (a memory tracker above its hard limit, a producer's own trim): they are
        lost. Record the range (Redis, then the file's writer_status) before the watermark
        passes it, so readers raise for it; fill it with the dataset's fill value; go on
        with the points after it."""
        name, start, stop = gone.stream, gone.start, gone.stop
        appender = self.appenders.get(name)
        if appender is None or start != appender.npoints or stop <= start:
            raise ScanFailed(f"stream {name!r}: {gone}; this writer was at point "
                             f"{getattr(appender, 'npoints', '?')}")
        definition = self.definitions[name]
        if definition.encoding == "references":
            raise ScanFailed(f"{gone}: a gap in a `references` stream cannot be filled")
        self._record_lost(name, start, stop)
        ranges = self.status.lost_points.setdefault(name, [])
        self.status.lost_points[name] = lost_points.merged(ranges + [[start, stop]])
        log.error("scan %s stream %r: points [%d, %d) were trimmed from Redis before the "
                  "writer stored them (a memory tracker above its hard limit?): LOST; filled "
                  "with the fill value in %s::%s, recorded in writer_status lost_points; "
                  "writing goes on from point %d", self.scan_key, name, start, stop,
                  self.where, self.dataset_paths[name], stop)
        self.service.record_lost(self.scan_key, stop - start)
        with self.file.lock:
            self.lease.check()
            for at in range(start, stop, _fill_batch(definition)):
                n = min(stop, at + _fill_batch(definition)) - at
                self._append_parts(name, at, [_filler(appender, definition, n)])

    def _record_lost(self, name: str, start: int, stop: int, patience_s: float = 30.0) -> None:
        """The range in Redis before any watermark passes it; while Redis is full (servers
        without script flags refuse the script then), again for a while."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                lost_points.record(self.service.redis, self.scan_key, name, start, stop,
                                   self.service.store.script_flags())
                return
            except redis.ResponseError as exc:  # OutOfMemoryError, or OOM inside the script
                if "OOM" not in str(exc) and not isinstance(exc, redis.OutOfMemoryError):
                    raise
            if time.monotonic() > deadline:
                raise ScanFailed(f"stream {name!r}: points [{start}, {stop}) were trimmed "
                                 f"from Redis before the writer stored them, and Redis stayed "
                                 f"full for {patience_s:.0f} s: the loss cannot be recorded "
                                 f"there")
            time.sleep(0.1)

    # ---- flushes and watermarks -------------------------------------------------------
    def flush(self, final: bool = False) -> bool:
        """Make every point appended durable and publish the watermarks; False if Redis was
        too full to take them (the caller flushes again soon)."""
        self.lease.check()
        with self.file.lock:
            durable = {name: a.flush(final) for name, a in self.appenders.items()}
            self.file.h5.flush()
        try:
            self.mark_durable(durable)
        except redis.OutOfMemoryError:
            # Redis is full (producers outran the memory tracker) and our watermark is what
            # lets anything be trimmed: make room by trimming what is now in the file.
            for name, points in self._trimmable(durable).items():
                trim_durable(self.service.redis, self.scan.streams[name].key, points)
            try:
                self.mark_durable(durable)
            except redis.OutOfMemoryError:  # still above maxmemory: next flush, more trimmed
                log.debug("scan %s: Redis full, watermark not published this time",
                          self.scan_key)
                return False
        t = time.time()
        written = sum(points * (self.definitions[n].point_nbytes or 0)
                      for n, points in durable.items())
        new_points = sum(durable.values()) - sum(self.status.points.values())
        new_bytes = written - self.status.bytes_written
        if self.status.updated and t > self.status.updated:
            self.status.write_rate_mb_s = max(0.0, new_bytes / (t - self.status.updated) / 1e6)
        published = self._published(list(durable))
        self.status.lag_points = max(0, published - sum(durable.values()))
        self.status.bytes_written = written
        self.status.points = durable
        writer_status.publish(self.service.redis, self.status)  # Redis full: next time
        self.service.record_flush(self.scan_key, new_points, new_bytes, self.status.lag_points)
        return True

    def mark_durable(self, durable: dict) -> None:
        Stream.mark_file_backed_all([(self.scan.streams[name], str(self.file_path),
                                      self.dataset_paths[name], points)
                                     for name, points in durable.items()],
                                    fence=self.lease.fence)

    def _published(self, names: list) -> int:
        """Points published so far in these streams (for the status's lag)."""
        return sum(Stream.lengths([self.scan.streams[n] for n in names]))

    def check_definitions(self, final: bool = False) -> None:
        """A stream redeclared mid-scan (a faulty producer): readers keep decoding with the
        definition it was prepared with, which the points sent before were sent with. The
        scan fails once the points published when the change was seen are in the file (or
        at once when `final`)."""
        changed = [n for n in self.scan.redefined if n in self.definitions]
        if not changed:
            return
        if self._redefined_at is None:
            self._redefined_at = {n: len(self.scan.streams[n]) for n in changed}
        if not final and any(self.appenders[n].npoints < published
                             for n, published in self._redefined_at.items()):
            return  # still reading what was published before
        name = changed[0]
        before, now = self.definitions[name], self.scan.redefined[name]
        raise ScanFailed(f"stream {name!r}: definition changed mid-scan (was {before.encoding} "
                         f"{before.dtype} {before.shape}, now {now.encoding} {now.dtype} "
                         f"{now.shape}); the points published before were written with the "
                         f"definition they were sent with")

    def _trimmable(self, durable: dict) -> dict:
        """The streams whose entries below their durable point may leave a full Redis."""
        return durable

