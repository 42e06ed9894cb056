"""Writes one scan: waits for PREPARED, builds the NeXus entry from the mapping, appends every
stream as events arrive, flushes within max_lag_s, publishes durable watermarks, finalizes.

One ScanWriter runs in its own thread. Any problem with the scan (bad mapping, refused path,
disk full, scan deleted...) ends this scan as "failed" with a reason in Redis, in the logs and
in the file when it can, without touching the other scans.

This module owns the scan's life: the thread, waiting for the scan's states, the steps in
order, finalizing, failing, pausing when the service stops, the status it publishes. Its
stages are objects of their own: the entry and its objects (``entry.ScanEntry``, the datasets
of its streams in ``datasets.StreamDatasets``) and the pump that reads, appends, flushes and
publishes watermarks (``pump.Pump``).
"""

from __future__ import annotations

import logging
import threading
import time

import redis
import tenacity

from blissdata import ScanNotFoundError, ScanState, lost_points
from blissdata.exceptions import IndexNoMoreThereError, LeaseLostError, MalformedEntryError
from blissdata.file_backing import DataFileError

from ..hdf5.file_space import stored_bytes
from ..hdf5.json_appender import JsonAppender
from ..hdf5.os_errors import is_file_error, os_reason
from ..hdf5.paths import PathRefused
from ..hdf5.varying_points import VaryingPointsAppender
from ..state import status as writer_status
from .entry import ScanEntry
from .errors import SCAN_GONE, ScanFailed, WriterStopping
from .mapping import MappingError
from .nexus_skeleton import EntryExistsError
from .pump import Pump

log = logging.getLogger("blisswriter")


def _redis_retrying(scan_key: str, stop_requested: threading.Event):
    """Retry the whole scan body on lost Redis connections, with backoff; the body resumes
    from the file and the durable watermarks, so nothing is written twice."""

    def before_sleep(state):
        log.warning("scan %s: Redis connection lost (%s), retrying in %.1f s",
                    scan_key, state.outcome.exception(), state.next_action.sleep)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
        wait=tenacity.wait_exponential(multiplier=0.2, max=5),
        stop=tenacity.stop_when_event_set(stop_requested),
        before_sleep=before_sleep, reraise=True)


def _lost_reason(lost: dict) -> str:
    return (f"{lost_points.count(lost)} points lost in Redis before the writer stored "
            f"them: {lost_points.describe(lost)}; every other point is in the file "
            f"(the lost ones hold the fill value; readers raise IndexNoMoreThereError)")


class ScanWriter(threading.Thread):
    """One scan's life, in a thread of its own; its stages: `entry_class`, `pump_class`."""

    # flush when the producer pauses, at most this often (None: never just for a pause, only
    # once the oldest point has waited half the lag: a 10 Hz scan pauses after every point)
    idle_flush_after_s = None
    # ... but a pause after this much data since the last flush flushes at once: the flush
    # then costs in proportion to what it stores (frames, bursts), and readers get it sooner
    idle_flush_bytes = 1 << 20
    # after a read that brought less than pump.GATHER_BYTES, wait this long (at most a tenth
    # of half the lag) before the next: points trickling in (64 counters at 1 kHz) come in
    # fewer reads, and a read costs per stream whatever it brings
    read_gather_s = 0.02
    # points of varying shape: padded, and their shapes in a dataset beside them
    varying_appender = VaryingPointsAppender
    # json points: texts and [start, stop) rows, readable under SWMR (blissdata.json_points)
    json_appender = JsonAppender
    # SWMR (docs/files.md): every object made when the entry is; a subclass that makes
    # objects later (blissdata2: the end of a scan as blisswriter 3 writes it) sets False
    writes_swmr = True

    # the stages, a protocol's own where it writes its own way (writer/protocols/blissdata2/)
    entry_class = ScanEntry
    pump_class = Pump

    def __init__(self, service, scan_key: str):
        super().__init__(name=f"scan-{scan_key[-9:-1]}", daemon=True)
        self.service = service
        self.config = service.config
        self.scan_key = scan_key
        self.scan = None
        # fencing: check() before writing; the status and watermarks are published only
        # while the lease holds our token (writer/state/lease.py)
        self.lease = service.writer_pool.lease(scan_key)
        self.status = writer_status.ScanStatus(scan_key, writer=service.identity,
                                               lease=self.lease.token)
        self._last_event = time.monotonic()
        self._stop_requested = threading.Event()
        # the knobs of this class (a protocol's, or monkeypatched) go to the stages as values
        self.scan_entry = self.entry_class(
            service, scan_key, self.lease, self.status, self._stop_requested,
            writes_swmr=self.writes_swmr, varying_appender=self.varying_appender,
            json_appender=self.json_appender)
        self.datasets = self.scan_entry.datasets  # stream name -> appender, definition, path
        self.pump = self.pump_class(
            service, scan_key, self.lease, self.status, self.scan_entry, name=self.name,
            check_scan=self._check_scan, event=self._event,
            idle_flush_after_s=self.idle_flush_after_s, idle_flush_bytes=self.idle_flush_bytes,
            read_gather_s=self.read_gather_s)

    # ---- thread body -----------------------------------------------------------------
    def run(self) -> None:
        try:
            for attempt in _redis_retrying(self.scan_key, self._stop_requested):
                with attempt:
                    self._write_scan()
        except LeaseLostError as exc:  # another writer has it now: write nothing more
            gone = self._gone_from_redis()
            if gone is None:  # Redis does not answer: let go of the file, then ask again
                self.scan_entry.release()
                gone = self._gone_once_redis_answers()
            if gone:  # no other writer: the lease went with the scan
                self._fail(f"{SCAN_GONE} ({exc})", gone=True)
            else:
                log.warning("scan %s: %s", self.scan_key, exc)
        except WriterStopping:
            self._pause()
        except (ScanFailed, MappingError, PathRefused, EntryExistsError) as exc:
            self._fail(str(exc))
        except MalformedEntryError as exc:  # the points before that entry are in the file
            self._fail(str(exc))
        except ScanNotFoundError as exc:
            self._fail(f"{SCAN_GONE} ({exc})", gone=True)
        except IndexNoMoreThereError as exc:  # gone from Redis where no gap can be filled
            self._fail(f"points gone from Redis: {exc}")
        except DataFileError as exc:  # a file that should hold points Redis no longer has
            self._fail(f"points trimmed from Redis cannot be read back: {exc}")
        except Exception as exc:
            if is_file_error(exc):
                log.debug("scan %s: %s", self.scan_key, exc)  # HDF5's full story
                self._fail(f"file {self.scan_entry.where}: {os_reason(exc)}")
            else:  # a bug: keep the service alive, say it loudly
                log.exception("scan %s: unexpected error", self.scan_key)
                self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.scan_entry.release()
            self.service.scan_finished(self)

    def stop(self) -> None:
        self._stop_requested.set()

    # ---- the steps -------------------------------------------------------------------
    def _write_scan(self) -> None:
        if self.scan_entry.file is not None and self._gone_from_redis():
            # a retry after a lost connection, to a Redis that came back without the scan:
            # its entry is ended while the file is still open (Redis still unreachable:
            # the file goes, another writer may take the scan; _fail reopens it if needed)
            raise ScanNotFoundError(f"scan {self.scan_key} no longer exists")
        self.scan_entry.release()  # a retry after a lost connection starts clean
        self.scan = self._load_scan()
        self.scan_entry.scan = self.pump.scan = self.scan
        ident = self.scan.identity
        self.status.session, self.status.number, self.status.name = (
            ident["session"], ident["number"], ident["name"])
        previous = writer_status.read(self.service.redis, self.scan_key)
        self._wait_for(ScanState.PREPARED)
        skip = self._skip_reason()
        if skip:
            self.status.state = "skipped"
            self.status.warn(skip)
            writer_status.publish(self.service.redis, self.status)
            log.info("scan %s %s:%s %s: not saved (%s)",
                     self.scan_key, ident["session"], ident["number"], ident["name"], skip)
            return
        self.status.expected_points = self.scan.info.get("npoints")
        layout = self.scan_entry.plan()
        self.scan_entry.open(layout, previous)
        self._stream_data()
        self._finalize()

    # ---- what another protocol (writer/protocols/blissdata2/) does its own way ------------------
    def _load_scan(self):
        return self.service.store.load_scan(self.scan_key)

    def _skip_reason(self) -> str | None:
        if self.scan.info.get("save") is False:  # the acquisition asked for no file
            return '"save": false in its info'
        return None

    # ---- data, waits and signs of life --------------------------------------------------
    def _stream_data(self) -> None:
        if not self.datasets.appenders:
            self._wait_for(ScanState.CLOSED)
            return
        self.pump.stream()

    def _wait_for(self, state: ScanState) -> None:
        while self.scan.state < state:
            if self.scan.update(block=True, timeout=1.0):
                self._event()
            self._check_alive()

    def _check_alive(self) -> None:
        if self._stop_requested.is_set():
            raise WriterStopping()
        self.lease.check()  # lost to another writer: let go of the file now, idle or not
        # A quiet scan is paused (beam refill, user pause), not failed: what came is already
        # durable (the data loop flushes when the flow stops); it shows "idle" and writing
        # goes on with its next event. Only its deletion from Redis ends it.
        quiet = time.monotonic() - self._last_event
        timeout = self.config.inactivity_timeout_s
        if self.status.state == "writing" and quiet > timeout:
            self.status.state = "idle"
            log.info("scan %s: no event for %.0f s (inactivity_timeout_s = %s): idle, its "
                     "points are in the file; writing resumes with the next event",
                     self.scan_key, quiet, timeout)
            writer_status.publish(self.service.redis, self.status)

    def _event(self) -> None:
        """Data or a state change came: the scan is alive (again)."""
        self._last_event = time.monotonic()
        if self.status.state == "idle":
            self.status.state = "writing"
            log.info("scan %s: events again after a pause, writing", self.scan_key)
            writer_status.publish(self.service.redis, self.status)

    def _gone_from_redis(self) -> bool | None:
        """Whether the scan's keys are gone from Redis; None if Redis does not answer."""
        try:
            return not self.service.redis.exists(self.scan_key)
        except redis.RedisError:
            return None

    def _gone_once_redis_answers(self) -> bool:
        """`_gone_from_redis()`, asked until Redis answers (False if the service stops
        first): a scan whose Redis came back empty still gets its entry ended."""
        pause = 0.2
        while not self._stop_requested.is_set():
            gone = self._gone_from_redis()
            if gone is not None:
                return gone
            self._stop_requested.wait(pause)
            pause = min(5.0, pause * 2)
        return False

    def _check_scan(self) -> None:
        """Between reads: deleted scan, inactivity, a changed stream definition."""
        if not self.service.redis.exists(self.scan_key):
            raise ScanNotFoundError(f"scan {self.scan_key} no longer exists")
        self._check_alive()
        if self.scan.update(block=False):
            self._event()
            self.scan_entry.info_updated()
        self.pump.check_definitions()

    # ---- the end ---------------------------------------------------------------------
    def _finalize(self) -> None:
        self._wait_for(ScanState.CLOSED)
        lost = self.status.lost_points
        # every point is in the file now: the lost ranges in Redis become exactly the gaps
        # this writer filled (the tracker counts as lost what the writer still held)
        try:
            lost_points.replace(self.service.redis, self.scan_key, lost,
                                list(self.datasets.appenders), self.service.store.script_flags())
        except redis.ResponseError as exc:  # Redis full: what the tracker recorded stays
            log.warning("scan %s: lost ranges in Redis not set to the writer's: %s",
                        self.scan_key, exc)
        file = self.scan_entry.file
        with file.lock:
            self.lease.check()
            end_reason = self.scan.info.get("end_reason", "SUCCESS")
            if lost:
                end_reason = f"{end_reason} WITH POINTS LOST"
            self.scan_entry.end(end_reason)
            self.status.state = "failed" if lost else "done"
            if lost:
                self.status.error = _lost_reason(self.status.lost_points)
            file.h5.flush()  # the size the file has
            self.status.stored_bytes = stored_bytes(file.h5)
            self.status.file_bytes = file.h5.id.get_filesize()
            writer_status.write_note(self.scan_entry.entry, self.status)
            file.h5.flush()
        # "done" once the file is closed: who waits for it can open it at once
        self.scan_entry.release()
        self._publish_final_status()
        if lost:
            log.error("scan %s %s:%s failed: %s; %s in each of %d streams -> %s::/%s",
                      self.scan_key, self.scan.session, self.scan.number, self.status.error,
                      self.status.points_text(), len(self.datasets.definitions),
                      self.scan_entry.where, self.scan_entry.entry_name)
            return
        log.info("scan %s %s:%s done: %s in each of %d streams, %.1f MB -> %s::/%s (%s)",
                 self.scan_key, self.scan.session, self.scan.number, self.status.points_text(),
                 len(self.datasets.definitions), self.status.bytes_written / 1e6,
                 self.scan_entry.where, self.scan_entry.entry_name,
                 self.scan.info.get("end_reason"))

    def _publish_final_status(self, patience_s: float = 30.0) -> None:
        """The last status of a scan must get out: while Redis is full, try again (the
        memory tracker makes room) for a while."""
        deadline = time.monotonic() + patience_s
        while not writer_status.publish(self.service.redis, self.status):
            if time.monotonic() > deadline:
                log.error("scan %s: Redis stayed full for %.0f s; its final status (%s) is "
                          "only in the file", self.scan_key, patience_s, self.status.state)
                return
            time.sleep(0.1)

    def _fail(self, reason: str, gone: bool = False) -> None:
        """End the scan as failed: the entry ended, the file closed, the status out.
        `gone`: the scan is gone from Redis; its lease may have gone with it (no other
        writer can take a scan Redis no longer has), the status goes out unfenced."""
        if gone:  # the lease may vanish with the scan any moment: nothing to fence
            self.status.lease = ""
        elif not self.lease.holds():  # another writer has the scan: its story, not ours
            log.warning("scan %s: %s; not recorded: this writer lost the scan's lease",
                        self.scan_key, reason)
            return
        if self.status.lost_points:
            reason = f"{reason}; {_lost_reason(self.status.lost_points)}"
        self.status.state = "failed"
        self.status.error = reason
        log.error("scan %s: failed: %s", self.scan_key, reason)
        entry = self.scan_entry
        if gone and entry.entry is None:
            entry.reopen()
        kept = ""
        if entry.entry is not None and entry.file is not None:
            durable_before = dict(self.status.points)  # what the last good flush published
            try:
                with entry.file.lock:
                    durable = {**self.status.points,
                               **{n: a.flush() for n, a in self.datasets.appenders.items()}}
                    self.status.points = durable
                    writer_status.write_note(entry.entry, self.status)
                    entry.end_failed("DELETION" if gone else "FAILURE")
                    entry.file.h5.flush()
                kept = f"; {sum(durable.values())} points kept in {entry.where}"
            except Exception as exc:  # the disk may be the problem: keep what is there
                # the points handed to HDF5 above may not be on disk: never publish them
                self.status.points = durable_before
                kept = (f"; {sum(self.status.points.values())} points durable in "
                        f"{entry.where} before that; the failure could not be recorded in "
                        f"the file: {os_reason(exc)}")
        self.status.error = reason + kept
        try:
            entry.release()  # "failed" once the file is closed, like "done"
        except Exception as exc:
            log.error("scan %s: closing %s: %s", self.scan_key, entry.file_path, exc)
        try:
            if self.status.points and self.service.redis.exists(self.scan_key):
                self.pump.mark_durable(self.status.points)  # readers get the kept points
        except (redis.RedisError, LeaseLostError) as exc:
            log.error("scan %s: could not publish the points kept to Redis: %s",
                      self.scan_key, exc)
        try:
            self._publish_final_status()
        except (redis.RedisError, LeaseLostError) as exc:
            log.error("scan %s: could not publish the failure to Redis: %s", self.scan_key, exc)
        if gone:
            self.service.record_gone(self.scan_key)

    def _pause(self) -> None:
        """Service stopping mid-scan: make what we have durable; a restart resumes."""
        if self.scan_entry.file is not None and self.datasets.appenders and \
                self.lease.holds():
            try:
                self.pump.flush()
            except LeaseLostError:
                return
        log.info("scan %s: writer stopping, %d points durable; a restart resumes it",
                 self.scan_key, sum(self.status.points.values()))
