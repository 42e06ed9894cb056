"""Writes one scan: waits for PREPARED, builds the NeXus entry from the mapping, appends every
stream as events arrive, flushes within max_lag_s, publishes durable watermarks, finalizes.

One ScanWriter runs in its own thread. Any problem with the scan (bad mapping, refused path,
disk full, scan deleted...) ends this scan as "failed" with a reason in Redis, in the logs and
in the file when it can, without touching the other scans.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import redis
import tenacity

from blissdata import ScanNotFoundError, ScanState, bslz4, lost_points
from blissdata.exceptions import (IndexNoMoreThereError, LeaseLostError, MalformedEntryError,
                                  PointsGoneError)
from blissdata.file_backing import DataFileError
from blissdata.encoding import StreamDefinition
from blissdata.memory_tracker import trim_durable
from blissdata.stream import Stream

from ..state import status as writer_status
from ..hdf5.dataset_writer import DatasetAppender, last_chunks
from ..hdf5.varying_points import VaryingPointsAppender
from .default_mapping import default_mapping
from ..hdf5.file_space import stored_bytes
from ..hdf5.os_errors import is_file_error, os_reason
from ..hdf5.shared_file import entry_in, link_entry, scan_file_in, sync_master_flags
from ..hdf5.superblock import swmr_capable
from .grid_plot import write_grid_plot
from ..hdf5.json_appender import JsonAppender
from .mapping import MappingError, parse_mapping
from .names import invalid_names, nexus_name
from .nexus_skeleton import (END_FIELDS, EntryExistsError, finalize_entry, is_finalized,
                             prepare_end_fields, set_text_field, stream_dataset_parent,
                             write_entry)
from ..hdf5.paths import PathRefused, check_link_target, scan_file_path
from ..state.pool import wait_for_file
from .read_ahead import ReadAhead
from ..hdf5.references import ReferencesAppender
from ..hdf5.text_appender import TextAppender

log = logging.getLogger("blisswriter")
READ_BYTES = 16 * 2**20  # target size of one read per stream
GATHER_BYTES = 4 * 2**20  # a read that brought less waits read_gather_s before the next
FILL_BYTES = 64 * 2**20  # a gap of lost points is filled at most this much at a time
#: why a scan whose keys vanished mid-write ends (the writer cannot tell which)
SCAN_GONE = "scan gone from Redis: deleted, or Redis restarted without its data"


def _nbytes(part) -> int:
    """Memory held by one piece a cursor read: an array, or a list of points or chunks."""
    if isinstance(part, np.ndarray):
        return part.nbytes
    return sum(len(p) if isinstance(p, (bytes, bytearray)) else getattr(p, "nbytes", 256)
               for p in part)


def _small(views: dict) -> bool:
    """A read that brought little: most of its cost was per stream, not per byte."""
    return sum(_nbytes(part) for view in views.values() for part in view.parts) < GATHER_BYTES


class ScanFailed(Exception):
    """This scan cannot be written; the message says why (shown to users as is)."""


class WriterStopping(Exception):
    """The service is stopping: flush, leave the scan "writing" so a restart resumes it."""


class ScanWriter(threading.Thread):
    # flush when the producer pauses, at most this often (None: never just for a pause, only
    # once the oldest point has waited half the lag: a 10 Hz scan pauses after every point)
    idle_flush_after_s = None
    # ... but a pause after this much data since the last flush flushes at once: the flush
    # then costs in proportion to what it stores (frames, bursts), and readers get it sooner
    idle_flush_bytes = 1 << 20
    # after a read that brought less than GATHER_BYTES, wait this long (at most a tenth of
    # half the lag) before the next: points trickling in (64 counters at 1 kHz) come in
    # fewer reads, and a read costs per stream whatever it brings
    read_gather_s = 0.02
    # points of varying shape: padded, and their shapes in a dataset beside them
    varying_appender = VaryingPointsAppender
    # json points: texts and [start, stop) rows, readable under SWMR (blissdata.json_points)
    json_appender = JsonAppender
    # SWMR (docs/files.md): every object made when the entry is; a subclass that makes
    # objects later (blissdata2: the end of a scan as blisswriter 3 writes it) sets False
    writes_swmr = True

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
        self.appenders: dict[str, DatasetAppender] = {}  # stream name -> appender
        self.definitions: dict[str, StreamDefinition] = {}  # as they were when writing began
        self.dataset_paths: dict[str, str] = {}  # stream name -> dataset path in the file
        self.file_path: Path | None = None  # the scan's own file (SWMR)
        self.master_path: Path | None = None  # the shared file linking to it ("shared" layout)
        self.file = None
        self.entry = None
        self._last_event = time.monotonic()
        self._stop_requested = threading.Event()
        self._largest_entry = 0  # bytes of the largest Redis entry read (sizes the reads)
        self._redefined_at = None  # stream name -> points published when seen redefined
        self._start_time_written = False
        self._entry_written = False  # this writer has had the scan's entry open

    # ---- thread body -----------------------------------------------------------------
    def run(self) -> None:
        try:
            for attempt in self._redis_retrying():
                with attempt:
                    self._write_scan()
        except LeaseLostError as exc:  # another writer has it now: write nothing more
            gone = self._gone_from_redis()
            if gone is None:  # Redis does not answer: let go of the file, then ask again
                self._release_file()
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
                self._fail(f"file {self.where}: {os_reason(exc)}")
            else:  # a bug: keep the service alive, say it loudly
                log.exception("scan %s: unexpected error", self.scan_key)
                self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._release_file()
            self.service.scan_finished(self)

    def stop(self) -> None:
        self._stop_requested.set()

    def _redis_retrying(self):
        """Retry the whole scan body on lost Redis connections, with backoff; the body resumes
        from the file and the durable watermarks, so nothing is written twice."""

        def before_sleep(state):
            log.warning("scan %s: Redis connection lost (%s), retrying in %.1f s",
                        self.scan_key, state.outcome.exception(), state.next_action.sleep)

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
            wait=tenacity.wait_exponential(multiplier=0.2, max=5),
            stop=tenacity.stop_when_event_set(self._stop_requested),
            before_sleep=before_sleep, reraise=True)

    # ---- the steps -------------------------------------------------------------------
    def _write_scan(self) -> None:
        if self.file is not None and self._gone_from_redis():
            # a retry after a lost connection, to a Redis that came back without the scan:
            # its entry is ended while the file is still open (Redis still unreachable:
            # the file goes, another writer may take the scan; _fail reopens it if needed)
            raise ScanNotFoundError(f"scan {self.scan_key} no longer exists")
        self._release_file()  # a retry after a lost connection starts clean
        self.scan = self._load_scan()
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
        layout = self._plan()
        self.layout = layout
        self._open_entry(layout, previous)
        self._stream_data()
        self._finalize()

    # ---- what another protocol (writer/protocols/blissdata2/) does its own way ------------------
    def _load_scan(self):
        return self.service.store.load_scan(self.scan_key)

    def _skip_reason(self) -> str | None:
        if self.scan.info.get("save") is False:  # the acquisition asked for no file
            return '"save": false in its info'
        return None

    def _new_entry(self, h5, layout):
        ranks = {n: 1 + len(s.definition.shape) for n, s in self.scan.streams.items()}
        return write_entry(h5, self.entry_name, layout, self.scan.info, ranks)

    def _write_header_note(self) -> None:
        writer_status.write_header_note(self.entry, self.scan, self.dataset_paths)

    def _dataset_parent(self, path: str):
        return stream_dataset_parent(self.entry, path)

    def _info_updated(self) -> None:
        """The scan's info was reloaded (a state change) while writing."""
        start_time = self.scan.info.get("start_time")
        if start_time and not self._start_time_written:
            with self.file.lock:  # made empty with the entry (SWMR), filled in place
                set_text_field(self.entry, "start_time", str(start_time))
            self._start_time_written = True

    def _end_failed_entry(self, end_reason: str) -> None:
        if not is_finalized(self.entry):
            finalize_entry(self.entry, self.scan.info, end_reason)

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

    def _plan(self):
        info = self.scan.info
        mapping = info.get("mapping")
        if mapping is None:
            mapping = default_mapping(self.scan.streams)
        # an inferred default plot never shows json points (its signal would be text)
        plottable = {n for n, s in self.scan.streams.items() if s.definition.encoding != "json"}
        layout = parse_mapping(mapping, stream_names=set(self.scan.streams), plottable=plottable)
        odd = invalid_names(layout.node_paths())
        if odd:  # the producer chose them: kept as given, said once
            self.status.warn(f"mapping names kept as given, not valid NeXus names (ASCII "
                             f"letters, digits, _, no leading digit): {', '.join(odd[:10])}"
                             + (f" and {len(odd) - 10} more" if len(odd) > 10 else ""))
        self.file_path = self._file_path()
        scan_path = self.master_path or self.file_path
        for link in getattr(layout, "external_links", []):
            # relative to the scan's path (as h5api reads them); HDF5 resolves them from the
            # folder of the file holding the link, the scan's own file
            check_link_target(link.file, scan_path, self.config.data_roots)
            if not os.path.isabs(link.file):
                link.file = os.path.relpath(scan_path.parent / link.file, self.file_path.parent)
        return layout

    def _file_path(self) -> Path:
        """The scan's own file. Layout "shared": the scan path is a file shared by the scans
        of a session, holding one external link per scan to its own file (docs/files.md)."""
        path = scan_file_path(self.scan.path, self.scan.number, self.config.file_layout,
                              self.config.data_roots)
        if self.config.file_layout == "per_scan":
            return path
        self.master_path = path
        return scan_file_in(self.master_path, self.entry_name)

    @property
    def where(self) -> str:
        """The scan's file as users know it (the shared file), and the scan's own file."""
        if self.master_path is None:
            return str(self.file_path)
        return f"{self.master_path} (scan file {self.file_path})"

    @property
    def entry_name(self) -> str:
        return self.scan.info.get("entry_name") or f"{self.scan.number}.1"

    def _open_entry(self, layout, previous) -> None:
        self.lease.check()
        self.status.file = str(self.master_path or self.file_path)
        self.status.entry = self.entry_name
        resuming = (previous is not None and previous.state in ("writing", "idle")
                    and previous.file == self.status.file
                    and previous.entry == self.entry_name)
        if not resuming:
            self.status.state = "writing"
            self.status.started = time.time()
            writer_status.publish(self.service.redis, self.status)  # before the entry exists
        else:
            self.status.started = previous.started
            self.status.state = "writing"
            self.status.warnings = previous.warnings + ["resumed after a writer restart"]
            self.status.lost_points = previous.lost_points  # filled gaps already in the file
        try:
            in_master = self.master_path is not None and entry_in(self.master_path,
                                                                  self.entry_name)
        except OSError as exc:
            raise ScanFailed(str(exc)) from None
        if not resuming and in_master:
            raise EntryExistsError(f"entry {self.entry_name} already exists in "
                                   f"{self.master_path}; the writer never overwrites an entry")
        self.file_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._acquire_file(resuming, self._swmr_possible())
        with self.file.lock:
            h5 = self.file.h5
            if resuming and self.entry_name in h5:
                self.entry = h5[self.entry_name]
                self._check_entry_is_ours()
                writer_status.write_note(self.entry, self.status)  # in its SWMR-ready form
                if self._swmr_possible() and self._entry_complete(layout):
                    # SWMR at once: readers of the points already there are not kept out
                    # (nor left unprotected) while the writer checks and trims its datasets
                    h5.flush()
                    self.file.start_swmr()
            else:
                self.entry = self._new_entry(h5, layout)
                writer_status.write_note(self.entry, self.status)
            self._create_appenders(layout, resume=resuming)
            if not self.file.swmr:  # (resuming in SWMR mode: made when the scan began)
                self._soft_links_to_own_files()
                self._write_header_note()
            # every object of the scan exists before SWMR writing starts (HDF5's rule):
            # what comes at the end is made now and filled then
            if self._swmr_possible():
                prepare_end_fields(self.entry)
            if self.scan.info.get("grid_shape") and "grid" not in self.entry:
                why_not = write_grid_plot(self.entry, self.scan.info,
                                          {n: a.dataset for n, a in self.appenders.items()})
                if why_not:
                    self.status.warn(f"no grid image: {why_not}")
            h5.flush()
            if self._swmr_possible() and not self.file.swmr:
                self.file.start_swmr()
        self._entry_written = True
        if self.master_path is not None:
            link_entry(self.master_path, self.entry_name, self.file_path)
        log.info("scan %s %s:%s %s -> %s::/%s%s", self.scan_key, self.scan.session,
                 self.scan.number, self.scan.name, self.where, self.entry_name,
                 " (resumed)" if resuming else "")

    def _acquire_file(self, resume: bool, swmr: bool):
        """The file, open for writing. Taken over from another writer that still has it
        locked (paused, or about to notice it lost the lease): wait for it to let go."""
        acquire = lambda: self.service.files.acquire(self.file_path, resume=resume,  # noqa: E731
                                                     swmr=swmr)
        # the pool claims files by the scan's path (with the shared layout, the shared file)
        claimed = str(self.master_path or self.file_path)
        if not self.service.writer_pool.file_claimed_by_another(claimed):
            return acquire()

        def tell():
            self.status.warn(f"waiting for the writer this scan was taken from to close "
                             f"{self.file_path}")
            writer_status.publish(self.service.redis, self.status)

        return wait_for_file(acquire, self.lease, self.config.inactivity_timeout_s,
                             self._stop_requested, tell)

    def _entry_complete(self, layout) -> bool:
        """Whether the entry has every object a scan begins with (a writer may have been
        killed while making them)."""
        entry = self.entry
        if self.scan.info.get("grid_shape") and "grid" not in entry:
            return False
        note = entry.get("writer_status/data")
        return (note is not None and note.dtype.kind == "S"
                and "scan_header/data" in entry
                and all(name in entry for name in END_FIELDS)
                and all(entry.get(node.path[1:], getlink=True) is not None
                        for node in layout.streams))

    def _swmr_possible(self) -> bool:
        """False for a scan resumed in a file an older version made without SWMR (scans with
        `json` or `references` streams were: variable-length strings, a virtual dataset
        made again at each flush). Such a file is written on as it was (docs/files.md)."""
        return self.writes_swmr and swmr_capable(self.file_path)

    def _check_entry_is_ours(self) -> None:
        note = self.entry.get("writer_status/data")
        if note is None:
            raise ScanFailed(f"entry {self.entry_name} in {self.where} exists and was not "
                             f"written by this writer for scan {self.scan_key}; not touched")
        raw = note[()]
        raw = raw.decode() if isinstance(raw, bytes) else raw
        if writer_status.ScanStatus.from_json(raw).scan_key != self.scan_key:
            raise ScanFailed(f"entry {self.entry_name} in {self.where} belongs to another "
                             f"scan; not touched")

    def _create_appenders(self, layout, resume: bool) -> None:
        durable = self._durable_points() if resume else {}
        for node in layout.streams:
            definition: StreamDefinition = self.scan.streams[node.stream].definition
            group, name = self._dataset_parent(node.path)
            if node.stream in self.appenders:  # the same stream at a second place
                if name not in group and definition.encoding == "references":
                    # its virtual dataset is rebuilt at each flush: link by path
                    group[name] = h5py.SoftLink(self.dataset_paths[node.stream])
                elif name not in group:  # one dataset, written once, at both places
                    group[name] = self.appenders[node.stream].dataset
                continue
            self.definitions[node.stream] = definition
            if definition.encoding == "references" and self._swmr_possible():
                appender = self._references_in_own_file(group, name, node, definition,
                                                        durable if resume else None)
            elif name in group and resume:
                appender = self._reopen(group[name], definition, durable.get(node.stream, 0))
            elif definition.encoding == "json":
                appender = self._new_json_appender(group, name, node)
            elif definition.encoding == "references":
                appender = ReferencesAppender(group, name, self.file_path, self._check_source,
                                              attrs=node.attrs, definition=definition,
                                              base=Path(self.scan.path).parent)
            else:  # points of varying shape: their shapes too, in a dataset beside them
                kind = self.varying_appender if definition.varying else DatasetAppender
                appender = kind(
                    group, name, definition.dtype, definition.shape,
                    compression=self.config.compression_for(
                        node.stream, scalar=tuple(definition.shape) == ()),
                    fill_value=self._fill_value(definition), attrs=node.attrs,
                    executor=self.service.pool, workers=self.config.compression_threads,
                    npoints=self.scan.info.get("npoints"),
                    count_time=self.scan.info.get("count_time"))
            self.appenders[node.stream] = appender
            self.dataset_paths[node.stream] = f"{group.name}/{name}"

    def _reopen(self, dataset, definition: StreamDefinition, durable: int):
        """Resume on a dataset written before a crash: keep only the points published as
        durable (what came after may be half-written); Redis still has the rest."""
        keep = min(durable, dataset.shape[0])
        try:  # a ValueError says what in the file cannot be appended to (a torn chunk, ...)
            if dataset.shape[0] != keep:
                last_chunks(dataset)  # a torn last row must not reach the resize's decoder
                dataset.resize(keep, axis=0)
            if definition.encoding == "json" and dataset.dtype.kind in "OSU":
                return TextAppender.open(dataset)  # a file of an older version
            if definition.encoding == "json":
                return JsonAppender.open(dataset, executor=self.service.pool,
                                         workers=self.config.compression_threads)
            if definition.encoding == "references":
                return ReferencesAppender.open(dataset, self.file_path, self._check_source,
                                               definition,
                                               base=Path(self.scan.path).parent)
            kind = self.varying_appender if definition.varying else DatasetAppender
            return kind.open(dataset, executor=self.service.pool,
                             workers=self.config.compression_threads)
        except ValueError as exc:
            raise ScanFailed(str(exc)) from None

    def _references_in_own_file(self, group, name: str, node, definition, durable):
        """A `references` stream of a scan written in SWMR mode: its virtual dataset in a
        file of its own, replaced whole at each flush (writer/hdf5/references.py), e.g.
        ``sample_3.1_eiger_image.h5`` beside ``sample_3.1.h5``."""
        stem = f"{self.file_path.stem}_{nexus_name(node.stream)}"
        own_file = self.file_path.with_name(stem + ".h5")
        taken = {getattr(a, "own_file", None) for a in self.appenders.values()}
        k = 1
        while own_file in taken:  # two stream names that give the same file name
            k += 1
            own_file = self.file_path.with_name(f"{stem}_{k}.h5")
        self._check_source(str(own_file))
        base = Path(self.scan.path).parent
        if durable is not None:
            return ReferencesAppender.open_own_file(
                group, name, own_file, self.file_path, self._check_source,
                durable.get(node.stream, 0), definition, base)
        return ReferencesAppender(group, name, self.file_path, self._check_source,
                                  attrs=node.attrs, definition=definition, base=base,
                                  own_file=own_file)

    def _soft_links_to_own_files(self) -> None:
        """Soft links to a `references` stream in its own file (the default plot, a second
        place, a mapping SOFT_LINK) become external links to that file: nexusformat loops
        forever on a soft link to an external link inside a file it reached through an
        external link (the shared file)."""
        targets = {self.dataset_paths[n]: self.entry.file.get(self.dataset_paths[n],
                                                                getlink=True)
                   for n, a in self.appenders.items() if getattr(a, "own_file", None)}
        if not targets:
            return
        found = []
        self.entry.visititems_links(lambda name, link: found.append(name) if isinstance(
            link, h5py.SoftLink) and link.path in targets else None)
        for name in found:
            target = targets[self.entry.get(name, getlink=True).path]
            del self.entry[name]
            self.entry[name] = h5py.ExternalLink(target.filename, target.path)

    def _new_json_appender(self, group, name: str, node):
        if self.json_appender is TextAppender:
            return TextAppender(group, name, attrs=node.attrs)
        return self.json_appender(
            group, name, compression=self.config.compression_for(node.stream, scalar=True),
            attrs=node.attrs, executor=self.service.pool,
            workers=self.config.compression_threads, npoints=self.scan.info.get("npoints"),
            count_time=self.scan.info.get("count_time"))

    def _trimmable(self, durable: dict) -> dict:
        """The streams whose entries below their durable point may leave a full Redis."""
        return durable

    def _check_source(self, path: str) -> None:
        check_link_target(path, str(self.file_path), self.config.data_roots)

    def _fill_value(self, definition: StreamDefinition):
        return np.nan if np.dtype(definition.dtype).kind in "fc" else self.config.fill_value_int

    def _durable_points(self) -> dict[str, int]:
        return {name: (s.file_backing or {}).get("points", 0)
                for name, s in self.scan.streams.items()}

    # ---- the data loop ---------------------------------------------------------------
    def _stream_data(self) -> None:
        names = list(self.appenders)
        if not names:
            self._wait_for(ScanState.CLOSED)
            return
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
                    self._check_definitions(final=True)  # a redefinition explains it
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
                    dirty_since = None if self._flush() else time.monotonic()
                    flush_s = min(time.monotonic() - now, half_lag / 2)
                    last_flush, unflushed_bytes = now, 0
                if now - last_state_check > 0.5:
                    last_state_check = now
                    self._check_scan()
        finally:
            ahead.close()
        while not self._flush(final=True):  # last chunks compressed; Redis full: retry
            self._check_scan()
            time.sleep(0.1)
        self._check_definitions(final=True)

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
            for at in range(start, stop, self._fill_batch(definition)):
                n = min(stop, at + self._fill_batch(definition)) - at
                self._append_parts(name, at, [self._filler(appender, definition, n)])

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

    @staticmethod
    def _fill_batch(definition: StreamDefinition) -> int:
        return max(1, FILL_BYTES // max(1, definition.point_nbytes or 1))

    @staticmethod
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

    def _lost_reason(self) -> str:
        lost = self.status.lost_points
        return (f"{lost_points.count(lost)} points lost in Redis before the writer stored "
                f"them: {lost_points.describe(lost)}; every other point is in the file "
                f"(the lost ones hold the fill value; readers raise IndexNoMoreThereError)")

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

    def _flush(self, final: bool = False) -> bool:
        """Make every point appended durable and publish the watermarks; False if Redis was
        too full to take them (the caller flushes again soon)."""
        self.lease.check()
        with self.file.lock:
            durable = {name: a.flush(final) for name, a in self.appenders.items()}
            self.file.h5.flush()
        try:
            self._mark_durable(durable)
        except redis.OutOfMemoryError:
            # Redis is full (producers outran the memory tracker) and our watermark is what
            # lets anything be trimmed: make room by trimming what is now in the file.
            for name, points in self._trimmable(durable).items():
                trim_durable(self.service.redis, self.scan.streams[name].key, points)
            try:
                self._mark_durable(durable)
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

    def _mark_durable(self, durable: dict) -> None:
        Stream.mark_file_backed_all([(self.scan.streams[name], str(self.file_path),
                                      self.dataset_paths[name], points)
                                     for name, points in durable.items()],
                                    fence=self.lease.fence)

    def _published(self, names: list) -> int:
        """Points published so far in these streams (for the status's lag)."""
        return sum(Stream.lengths([self.scan.streams[n] for n in names]))

    def _check_scan(self) -> None:
        """Between reads: deleted scan, inactivity, a changed stream definition."""
        if not self.service.redis.exists(self.scan_key):
            raise ScanNotFoundError(f"scan {self.scan_key} no longer exists")
        self._check_alive()
        if self.scan.update(block=False):
            self._event()
            self._info_updated()
        self._check_definitions()

    def _check_definitions(self, final: bool = False) -> None:
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

    # ---- the end ---------------------------------------------------------------------
    def _finalize(self) -> None:
        self._wait_for(ScanState.CLOSED)
        lost = self.status.lost_points
        # every point is in the file now: the lost ranges in Redis become exactly the gaps
        # this writer filled (the tracker counts as lost what the writer still held)
        try:
            lost_points.replace(self.service.redis, self.scan_key, lost, list(self.appenders),
                                self.service.store.script_flags())
        except redis.ResponseError as exc:  # Redis full: what the tracker recorded stays
            log.warning("scan %s: lost ranges in Redis not set to the writer's: %s",
                        self.scan_key, exc)
        with self.file.lock:
            self.lease.check()
            end_reason = self.scan.info.get("end_reason", "SUCCESS")
            if lost:
                end_reason = f"{end_reason} WITH POINTS LOST"
            finalize_entry(self.entry, self.scan.info, end_reason)
            if not self.file.swmr:  # again, with the end time and reason
                writer_status.write_header_note(self.entry, self.scan, self.dataset_paths)
            self.status.state = "failed" if lost else "done"
            if lost:
                self.status.error = self._lost_reason()
            self.file.h5.flush()  # the size the file has
            self.status.stored_bytes = stored_bytes(self.file.h5)
            self.status.file_bytes = self.file.h5.id.get_filesize()
            writer_status.write_note(self.entry, self.status)
            self.file.h5.flush()
        # "done" once the file is closed: who waits for it can open it at once
        self._release_file()
        self._publish_final_status()
        if lost:
            log.error("scan %s %s:%s failed: %s; %s in each of %d streams -> %s::/%s",
                      self.scan_key, self.scan.session, self.scan.number, self.status.error,
                      self.status.points_text(), len(self.definitions), self.where,
                      self.entry_name)
            return
        log.info("scan %s %s:%s done: %s in each of %d streams, %.1f MB -> %s::/%s (%s)",
                 self.scan_key, self.scan.session, self.scan.number, self.status.points_text(),
                 len(self.definitions), self.status.bytes_written / 1e6, self.where,
                 self.entry_name, self.scan.info.get("end_reason"))

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
            reason = f"{reason}; {self._lost_reason()}"
        self.status.state = "failed"
        self.status.error = reason
        log.error("scan %s: failed: %s", self.scan_key, reason)
        if gone and self.entry is None:
            self._reopen_entry()
        kept = ""
        if self.entry is not None and self.file is not None:
            durable_before = dict(self.status.points)  # what the last good flush published
            try:
                with self.file.lock:
                    durable = {**self.status.points,
                               **{n: a.flush() for n, a in self.appenders.items()}}
                    self.status.points = durable
                    writer_status.write_note(self.entry, self.status)
                    self._end_failed_entry("DELETION" if gone else "FAILURE")
                    self.file.h5.flush()
                kept = f"; {sum(durable.values())} points kept in {self.where}"
            except Exception as exc:  # the disk may be the problem: keep what is there
                # the points handed to HDF5 above may not be on disk: never publish them
                self.status.points = durable_before
                kept = (f"; {sum(self.status.points.values())} points durable in "
                        f"{self.where} before that; the failure could not be recorded in "
                        f"the file: {os_reason(exc)}")
        self.status.error = reason + kept
        try:
            self._release_file()  # "failed" once the file is closed, like "done"
        except Exception as exc:
            log.error("scan %s: closing %s: %s", self.scan_key, self.file_path, exc)
        try:
            if self.status.points and self.service.redis.exists(self.scan_key):
                self._mark_durable(self.status.points)  # readers get the kept points
        except (redis.RedisError, LeaseLostError) as exc:
            log.error("scan %s: could not publish the points kept to Redis: %s",
                      self.scan_key, exc)
        try:
            self._publish_final_status()
        except (redis.RedisError, LeaseLostError) as exc:
            log.error("scan %s: could not publish the failure to Redis: %s", self.scan_key, exc)
        if gone:
            self.service.record_gone(self.scan_key)

    def _reopen_entry(self) -> None:
        """The entry of a scan that vanished from Redis while this writer had let go of its
        file (Redis unreachable for a while, then back without the scan): opened again to
        be ended. No other writer can take a scan Redis no longer has."""
        if not self._entry_written or not self.file_path.exists():
            return  # (a writer that never had the entry leaves it to the one that had it)
        try:
            self.file = self.service.files.acquire(self.file_path, resume=True,
                                                   swmr=self._swmr_possible())
            with self.file.lock:
                self.entry = self.file.h5.get(self.entry_name)
                if self.entry is not None:
                    self._check_entry_is_ours()
        except Exception as exc:  # locked by another process, unreadable, not ours
            log.error("scan %s: its entry in %s stays unended: %s", self.scan_key,
                      self.where, exc)
            self._release_file()

    def _pause(self) -> None:
        """Service stopping mid-scan: make what we have durable; a restart resumes."""
        if self.file is not None and self.appenders and self.lease.holds():
            try:
                self._flush()
            except LeaseLostError:
                return
        log.info("scan %s: writer stopping, %d points durable; a restart resumes it",
                 self.scan_key, sum(self.status.points.values()))

    def _release_file(self) -> None:
        if self.file is not None:
            self.service.files.release(self.file)
            self.file, self.entry = None, None
            self.appenders.clear()
            if self.master_path is not None:  # plain opens of the shared file work again
                try:
                    sync_master_flags(self.master_path)
                except (OSError, ValueError) as exc:
                    log.warning("scan %s: %s: %s", self.scan_key, self.master_path, exc)
