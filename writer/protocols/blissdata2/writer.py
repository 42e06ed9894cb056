"""The scan writer on a blissdata 2 scan: the file and tree come from h5maps
(`Bliss2Entry`), the watermarks go where blissdata 2 readers look (`Bliss2Pump`), and the
scan ends as blisswriter 3 ends it (`Bliss2ScanWriter`)."""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath

import h5py
import redis

from blissdata import ScanState
from blissdata.exceptions import LeaseLostError

from ...hdf5.dataset_writer import DatasetAppender
from ...hdf5.paths import check_link_target, resolve_scan_file
from ...hdf5.text_appender import TextAppender
from ...scan.entry import ScanEntry
from ...scan.errors import ScanFailed
from ...scan.nexus_skeleton import stream_dataset_parent
from ...scan.pump import Pump
from ...scan.scan_writer import ScanWriter
from ...state import status as writer_status
from .h5maps import apply_final, iter_nodes, plan, stamp_root, write_missing, write_static
from .protocol import Bliss2Error, DURABLE_TTL_S, durable_key
from .scan import Bliss2Scan, Bliss2Stream

log = logging.getLogger("blisswriter")


_MARK_DURABLE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return redis.error_reply('LEASELOST') end
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Bliss2Pump(Pump):
    """The pump of a blissdata 2 scan: its watermarks in the hash blissdata 2 readers read."""

    def _published(self, names: list) -> int:
        """Points published in these streams, the last entries read in one round trip."""
        streams = [self.scan.streams[n] for n in names]
        plain = [s for s in streams if s.lima is None]
        pipe = self.scan.client.pipeline(transaction=False)
        for stream in plain:
            pipe.xrevrange(stream.key, count=1)
        return (sum(Bliss2Stream.length_from(last) for last in pipe.execute())
                + sum(len(s) for s in streams if s.lima is not None))

    def mark_durable(self, durable: dict) -> None:
        """All watermarks in one round trip (64 counters are 64 streams), only while this
        writer holds the scan's lease (fencing, as for native scans)."""
        lease_key, token = self.lease.fence
        args = [token, DURABLE_TTL_S]
        for name, points in durable.items():
            args += [name, json.dumps({"file": str(self.file_path),
                                       "dataset": self.dataset_paths[name],
                                       "points": int(points)})]
        try:
            self.service.redis.eval(_MARK_DURABLE, 2, durable_key(self.scan_key), lease_key,
                                    *args)
        except redis.ResponseError as exc:
            if "LEASELOST" not in str(exc):
                raise
            raise LeaseLostError(f"scan {self.scan_key}: watermarks not published: another "
                                 "writer holds the scan's lease") from None

    def _trimmable(self, durable: dict) -> dict:
        """Not a lima stream's entries: they are statuses, not frames, and its readers need
        the newest one."""
        return {n: p for n, p in durable.items() if self.scan.streams[n].lima is None}


class Bliss2Entry(ScanEntry):
    """The entry of a blissdata 2 scan: its file and tree come from h5maps."""

    def plan(self):
        layout = plan(self.scan.info, set(self.scan.streams), self.scan.path)
        self.lima2_links: list = []  # (HDF5 path, lima2 stream)
        for node in list(layout.streams):
            stream = self.scan.streams[node.stream]
            stream.definition  # Bliss2Error names the stream
            if stream.lima is not None and not stream.lima.saved:
                # blisswriter 3.0.0 drops the stream with a warning, writes the rest
                layout.streams.remove(node)
                self.status.warn(f"stream {node.stream!r} not written ({node.path}): lima "
                                 "saving is off, no file holds its frames (as blisswriter "
                                 "3.0.0)")
            elif stream.lima is not None:
                stream.saving_dir = str(PurePosixPath(layout.file).parent)
            elif stream.lima2_master is not None:
                # an external link to the detector's master file, made at the end of the
                # scan as blisswriter 3.0.0 does (its frame count is known then)
                layout.streams.remove(node)
                check_link_target(stream.lima2_master[0], layout.file, self.config.data_roots)
                self.lima2_links.append((node.path, stream))
        self.file_path = resolve_scan_file(layout.file, self.config.data_roots)
        for file, root in [(layout.file, layout.root), *layout.others.items()]:
            resolve_scan_file(file, self.config.data_roots)
            for node in iter_nodes(root):
                if node.kind == "external_link":
                    check_link_target(node.value[0], file, self.config.data_roots)
                elif node.kind == "external_binary":
                    for f in node.value[2]:
                        check_link_target(f[0], file, self.config.data_roots)
        return layout

    def _write_others(self, roots: dict, before: dict | None = None) -> None:
        """The static content of the other files of h5maps (master files...): what is not
        there yet, or at the end (`before`: the roots written first) what changed."""
        for file, root in roots.items():
            path = resolve_scan_file(file, self.config.data_roots)
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = self.service.files.acquire(path)
            try:
                with handle.lock:
                    def check(target, file=str(path)):
                        check_link_target(target, file, self.config.data_roots)
                    if before is not None and file in before:
                        apply_final(handle.h5, before[file], root, check, self.status.warn)
                    write_missing(handle.h5, "", root, check)  # also after a resume
                    stamp_root(handle.h5)
                    handle.h5.flush()
            finally:
                self.service.files.release(handle)

    @property
    def entry_name(self) -> str:
        return self.layout.entry_name

    def _new_entry(self, h5, layout):
        """The h5map's static part, as blisswriter writes it at PREPARED."""
        if layout.entry_name in h5:
            raise ScanFailed(f"{layout.entry_name} already exists in {self.file_path}; not "
                             "overwritten")
        write_static(h5, "", layout.root, self._check_source)
        stamp_root(h5)
        self._write_others(layout.others)
        return h5[layout.entry_name]

    def _write_header_note(self) -> None:
        pass  # the scan header note is for native scans (blissdata.archive replays them)

    def _dataset_parent(self, path: str):
        return stream_dataset_parent(self.file.h5, path)

    def info_updated(self) -> None:
        pass  # blissdata 2 info changes only at CLOSED: Bliss2ScanWriter._finalize applies it

    def end_failed(self, end_reason: str) -> None:
        pass  # blisswriter writes no end_reason: the writer_status note says why

    def write_final(self) -> None:
        """At CLOSED (the file's lock held): the final h5maps applied, the lima2 links."""
        h5 = self.file.h5
        try:
            final = plan(self.scan.info, set(self.scan.streams), self.scan.path)
        except Bliss2Error as exc:
            self.status.warn(f"final h5maps not applied: {exc}")
        else:
            if final.file != self.layout.file:
                self.status.warn(f"final h5maps names another file ({final.file}); "
                                 "not written")
            else:
                apply_final(h5, self.layout.root, final.root, self._check_source,
                            self.status.warn)
                stamp_root(h5)
                self._write_others(final.others, before=self.layout.others)
        self._link_lima2(h5)
        self.entry = h5[self.entry_name]

    def _link_lima2(self, h5: h5py.File) -> None:
        """Lima2 streams with frames: an external link to the master file, its path relative
        to the scan file's folder when below it (blisswriter 3.0.0's Lima2StreamWriter)."""
        for path, stream in self.lima2_links:
            parent_path, name = path.rsplit("/", 1)
            parent = h5[parent_path or "/"]
            if name in parent or not stream.lima2_frames():
                continue
            file, dataset = stream.lima2_master
            try:
                file = str(PurePosixPath(file).relative_to(PurePosixPath(self.layout.file).parent))
            except ValueError:
                pass
            parent[name] = h5py.ExternalLink(file, dataset)


class Bliss2ScanWriter(ScanWriter):
    """The scan writer on a blissdata 2 scan: the file and tree come from h5maps."""

    protocol = "blissdata2"
    # blissdata 2 sends a point per stream per entry (no batching across streams): at 50 Hz
    # the producer "pauses" between every point; flushing each time costs more than it gains
    idle_flush_after_s = 0.2
    # varying shapes padded as blisswriter 3.0.0 does, with no dataset of shapes beside
    varying_appender = DatasetAppender
    # json points as variable-length strings, as blisswriter 3.0.0 writes them
    json_appender = TextAppender
    # objects made at CLOSED, as blisswriter 3 does: not SWMR (docs/files.md)
    writes_swmr = False
    entry_class = Bliss2Entry
    pump_class = Bliss2Pump

    def run(self) -> None:
        # this thread compresses only small pieces (partial chunks; full ones go to the pool):
        # an OpenMP team per call costs more than it gains, above all on a busy machine
        from blissdata import bslz4

        bslz4.set_openmp_threads(1)
        super().run()

    def _load_scan(self):
        return Bliss2Scan(self.service.redis, self.scan_key)

    def _skip_reason(self) -> str | None:
        if not self.scan.path:
            return "no path in the scan identity: not to be saved (as blisswriter 3.0.0)"
        if not self.scan.info.get("h5maps"):
            return "no h5maps in the scan info: nothing to write (as blisswriter 3.0.0)"
        return None

    def _finalize(self) -> None:
        self._wait_for(ScanState.CLOSED)
        entry = self.scan_entry
        with entry.file.lock:
            entry.write_final()
            self.status.state = "done"
            writer_status.write_note(entry.entry, self.status)
            entry.file.h5.flush()
        self._publish_final_status()
        log.info("scan %s %s:%s done: %s in each of %d streams -> %s::/%s (%s)",
                 self.scan_key, self.scan.session, self.scan.number,
                 self.status.points_text(), len(self.datasets.appenders), entry.file_path,
                 entry.entry_name, self.scan.info.get("end_reason"))
