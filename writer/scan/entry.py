"""The scan's entry and its objects: where its file goes (the plan from the mapping), opening
or creating the file and the NeXus entry (or resuming on one a writer before left), the
datasets of its streams (``datasets.StreamDatasets``), references and soft links, opening it
again to end it, its end fields, and letting go of the file.

The scan's life (``scan_writer.ScanWriter``) says when; a protocol with its own tree
(writer/protocols/blissdata2/) subclasses `ScanEntry`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from ..hdf5.paths import check_link_target, scan_file_path
from ..hdf5.shared_file import entry_in, link_entry, scan_file_in, sync_master_flags
from ..hdf5.superblock import swmr_capable
from ..state import status as writer_status
from ..state.pool import wait_for_file
from .datasets import StreamDatasets
from .default_mapping import default_mapping
from .errors import ScanFailed
from .grid_plot import write_grid_plot
from .mapping import parse_mapping
from .names import invalid_names
from .nexus_skeleton import (END_FIELDS, EntryExistsError, finalize_entry, is_finalized,
                             prepare_end_fields, set_text_field, stream_dataset_parent,
                             write_entry)

log = logging.getLogger("blisswriter")


class ScanEntry:
    """The file and NeXus entry of one scan, and the datasets of its streams in it."""

    def __init__(self, service, scan_key: str, lease, status,
                 stop_requested: threading.Event, *, writes_swmr: bool, varying_appender,
                 json_appender):
        """`stop_requested`: the service stops (waiting for a file ends); the rest:
        ScanWriter's knobs."""
        self.service = service
        self.config = service.config
        self.scan_key = scan_key
        self.lease = lease
        self.status = status
        self._stop_requested = stop_requested
        self.writes_swmr = writes_swmr
        self.scan = None  # the scan being written (the writer sets it at each attempt)
        self.layout = None  # what plan() gave, once the entry is opened
        self.datasets = StreamDatasets(
            service, dataset_parent=self._dataset_parent, check_source=self._check_source,
            swmr_possible=self._swmr_possible, varying_appender=varying_appender,
            json_appender=json_appender)
        self.file_path: Path | None = None  # the scan's own file (SWMR)
        self.master_path: Path | None = None  # the shared file linking to it ("shared" layout)
        self.file = None
        self.entry = None
        self._start_time_written = False
        self._entry_written = False  # this writer has had the scan's entry open

    # ---- what another protocol (writer/protocols/blissdata2/) does its own way ----------
    def _new_entry(self, h5, layout):
        ranks = {n: 1 + len(s.definition.shape) for n, s in self.scan.streams.items()}
        return write_entry(h5, self.entry_name, layout, self.scan.info, ranks)

    def _write_header_note(self) -> None:
        writer_status.write_header_note(self.entry, self.scan, self.datasets.dataset_paths)

    def _dataset_parent(self, path: str):
        return stream_dataset_parent(self.entry, path)

    def info_updated(self) -> None:
        """The scan's info was reloaded (a state change) while writing."""
        start_time = self.scan.info.get("start_time")
        if start_time and not self._start_time_written:
            with self.file.lock:  # made empty with the entry (SWMR), filled in place
                set_text_field(self.entry, "start_time", str(start_time))
            self._start_time_written = True

    def end_failed(self, end_reason: str) -> None:
        if not is_finalized(self.entry):
            finalize_entry(self.entry, self.scan.info, end_reason)

    # ---- the file and the entry ----------------------------------------------------------
    def plan(self):
        """What the entry holds (the mapping's layout) and the scan's own file."""
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

    def open(self, layout, previous) -> None:
        """The file and entry, new or resumed (`previous`: the status a writer before
        published), with a dataset per stream; the status says "writing"."""
        self.layout = layout
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
            self.datasets.create(self.scan, layout, resuming, self.file_path)
            if not self.file.swmr:  # (resuming in SWMR mode: made when the scan began)
                self.datasets.soft_links_to_own_files(self.entry)
                self._write_header_note()
            # every object of the scan exists before SWMR writing starts (HDF5's rule):
            # what comes at the end is made now and filled then
            if self._swmr_possible():
                prepare_end_fields(self.entry)
            if self.scan.info.get("grid_shape") and "grid" not in self.entry:
                why_not = write_grid_plot(self.entry, self.scan.info,
                                          {n: a.dataset for n, a
                                           in self.datasets.appenders.items()})
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

    def _check_source(self, path: str) -> None:
        check_link_target(path, str(self.file_path), self.config.data_roots)

    # ---- the end ----------------------------------------------------------------------
    def reopen(self) -> None:
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
            self.release()

    def release(self) -> None:
        """Let go of the file (its datasets' appenders with it)."""
        if self.file is not None:
            self.service.files.release(self.file)
            self.file, self.entry = None, None
            self.datasets.appenders.clear()
            if self.master_path is not None:  # plain opens of the shared file work again
                try:
                    sync_master_flags(self.master_path)
                except (OSError, ValueError) as exc:
                    log.warning("scan %s: %s: %s", self.scan_key, self.master_path, exc)

    def end(self, end_reason: str) -> None:
        """The entry's end fields, when the scan ended (the file's lock held)."""
        finalize_entry(self.entry, self.scan.info, end_reason)
        if not self.file.swmr:  # again, with the end time and reason
            writer_status.write_header_note(self.entry, self.scan, self.datasets.dataset_paths)
