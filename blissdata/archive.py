"""Archived scans with the surface of live ones: processing code written against a live
`Scan` runs unchanged on a file written months ago.

    scan = open_scan("sample.h5", entry="3.1")
    scan.info, scan.state                      # rebuilt from the file; CLOSED
    diode = scan.streams["diode:diode"]
    len(diode), diode[0], diode[10:20]         # read from the file
    cursor = scan.cursor(); cursor.read()      # the same cursor reads as live

Files written by blisswriter keep the scan header (`<entry>/scan_header`): the info, mapping
and stream definitions come back exactly. Files written by other programs: the layout is
rebuilt from the file (every numeric dataset with a first axis is a stream, the rest RAW);
what cannot be read as a stream is listed in `scan.not_replayable` with the reason.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters for reading)
import numpy as np

from .encoding import StreamDefinition
from .json_points import json_points
from .point_shapes import varying_points
from .file_backing import open_h5
from . import lost_points
from .exceptions import BlissdataError, EndOfStream, IndexWontBeThereError, PointsGoneError
from .scan import ScanState
from .cursor import StreamView


class ArchiveError(BlissdataError, ValueError):
    """The file or entry cannot be opened as a scan; the message says what is missing."""


def _jsonable(value):
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.dtype.kind in "OSU" \
            else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class ArchivedStream:
    def __init__(self, scan, definition: StreamDefinition, dataset: h5py.Dataset,
                 lost: list | None = None):
        self._scan = scan
        self.definition = definition
        self.dataset = dataset
        # ranges lost in Redis before the writer stored them: fill values in the file
        self.lost = lost or []

    name = property(lambda self: self.definition.name)
    encoding = property(lambda self: self.definition.encoding)
    shape = property(lambda self: self.definition.shape)
    info = property(lambda self: self.definition.info)
    sealed = True

    @property
    def dtype(self):
        return np.dtype(self.definition.dtype) if self.definition.dtype else None

    @property
    def file_backing(self) -> dict:
        return {"file": self._scan.path, "dataset": self.dataset.name, "points": len(self)}

    def __len__(self) -> int:
        return self.dataset.shape[0]

    def __repr__(self):
        return f"<ArchivedStream {self.name!r} {len(self)} points in {self.dataset.name}>"

    def read_points(self, start: int, stop: int):
        """Points [start, stop) from the file (PointsGoneError where some were lost)."""
        gone = lost_points.overlapping(self.lost, start, stop)
        if gone:
            raise PointsGoneError(f"stream {self.name!r} of {self._scan.path}::"
                                  f"{self._scan.entry_name}: points [{start}, {stop}) are not "
                                  f"in the file; lost (trimmed from Redis before the writer "
                                  f"stored them): {gone}", self.name, start, stop)
        data = self.dataset[start:stop]
        if self.encoding == "json":  # texts beside their rows, or strings (older files)
            return json_points(self.dataset, start, data, refresh=True)
        if self.definition.varying:  # each point cut to its own shape (point_shapes.py)
            return varying_points(self.dataset, start, data)
        return data

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step < 1:
                raise ValueError(f"stream {self.name!r}: step must be >= 1 (got {step}), "
                                 f"as in h5py")
            return self.read_points(start, max(start, stop))[::step]
        index = int(item)
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexWontBeThereError(f"stream {self.name!r}: index {item} out of the "
                                        f"{n} points archived in {self._scan.path}")
        return self.read_points(index, index + 1)[0]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            yield from self.read_points(start, min(start + 1024, len(self)))

    @functools.cached_property
    def stored_as_frames(self) -> bool:
        """One frame per chunk, Bitshuffle+LZ4 only: chunks are points in the bslz4 format."""
        d = self.dataset
        if self.encoding not in ("numeric", "bslz4") or self.definition.varying or \
                d.ndim < 2 or d.is_virtual or d.chunks != (1, *d.shape[1:]):
            return False
        plist = d.id.get_create_plist()
        return [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [32008]

    def chunks(self, start: int, stop: int) -> list[bytes]:
        """The stored chunks of points [start, stop), untouched (when stored_as_frames)."""
        zeros = (0,) * (self.dataset.ndim - 1)
        read = self.dataset.id.read_direct_chunk
        return [read((i, *zeros))[1] for i in range(start, stop)]


class ArchivedCursor:
    """Same reads as a live CursorGroup; everything is there already."""

    def __init__(self, streams, start=0, batch: int = 1024):
        self.streams = {s.name: s for s in streams}
        starts = start if isinstance(start, dict) else {}
        self._next = {n: int(starts.get(n, 0 if starts else start)) for n in self.streams}
        self.ended: set[str] = set()
        self.batch = batch

    def position(self, name: str) -> int:
        return self._next[name]

    def read(self, block: bool = True, timeout: float | None = None, count=None):
        open_names = [n for n in self.streams if n not in self.ended]
        if not open_names:
            raise EndOfStream(f"every stream of this cursor is read: {sorted(self.streams)}")
        views = {}
        for name in open_names:
            stream, start = self.streams[name], self._next[name]
            stop = min(len(stream), start + self.batch)
            if stop > start:
                views[name] = StreamView(stream, start,
                                         [stream.read_points(start, stop)])
                self._next[name] = stop
            if self._next[name] >= len(stream):
                self.ended.add(name)
        return views


class ArchivedScan:
    """What `open_scan` returns: the surface of a live Scan, backed by the file."""

    state = ScanState.CLOSED

    def __init__(self, path: str, entry: str, h5: h5py.File):
        self.path = str(Path(path).resolve())
        self.entry_name = entry
        self.key = f"file:{self.path}::{entry}"
        self._h5 = h5
        self.not_replayable: dict[str, str] = {}
        group = h5[entry]
        note = group.get("scan_header/data")
        if note is not None:
            self._from_header(group, json.loads(_jsonable(note[()])))
        else:
            self._from_layout(group)

    # ---- files written by blisswriter ----------------------------------------------------
    def _from_header(self, group, header: dict) -> None:
        self.identity = header["identity"]
        self.info = header["info"]
        for field in ("start_time", "end_time", "end_reason"):  # filled after the header
            if field not in self.info and _text(group, field):
                self.info[field] = _text(group, field)
        self.streams = {}
        lost = lost_points.recorded_in(group)
        for name, d in header["streams"].items():
            dataset = self._h5.get(header.get("datasets", {}).get(name, ""))
            if dataset is None:
                self.not_replayable[name] = "its dataset is not in the file"
                continue
            self.streams[name] = ArchivedStream(self, StreamDefinition.from_json(d), dataset,
                                                lost.get(name))

    # ---- files written by other programs ---------------------------------------------------
    def _from_layout(self, group) -> None:
        number = self.entry_name.split(".")[0]
        self.identity = {"session": "archive", "name": _text(group, "title") or "scan",
                         "number": int(number) if number.isdigit() else 0, "path": self.path}
        self.info = {"title": _text(group, "title") or self.entry_name, "type": "archived",
                     "scan_nb": self.identity["number"]}
        for field in ("start_time", "end_time", "end_reason"):
            if _text(group, field):
                self.info[field] = _text(group, field)
        self.streams = {}
        seen: dict = {}
        self.info["mapping"] = self._node(group, group.name, seen)
        self.info["npoints"] = max((len(s) for s in self.streams.values()), default=0)

    def _node(self, obj, root: str, seen: dict):
        attrs = {k: _jsonable(v) for k, v in obj.attrs.items()}
        if isinstance(obj, h5py.Group):
            children = {}
            for name in obj:
                link = obj.get(name, getlink=True)
                rel = f"{obj.name}/{name}"[len(root):]
                if isinstance(link, h5py.SoftLink):
                    target = link.path
                    if target.startswith(root + "/"):
                        children[name] = [{}, "SOFT_LINK", target[len(root):]]
                    else:
                        self.not_replayable[rel] = f"soft link to {target}, outside the entry"
                    continue
                if isinstance(link, h5py.ExternalLink):
                    children[name] = [{}, "EXTERNAL_LINK",
                                      {"file": link.filename, "path": link.path}]
                    continue
                try:
                    child = obj[name]
                except (KeyError, OSError) as exc:
                    self.not_replayable[rel] = f"cannot be read: {exc}"
                    continue
                node = self._node(child, root, seen)
                if node is not None:
                    children[name] = node
            return [attrs, children]
        rel = obj.name[len(root):]
        if obj.id in seen:  # a second hard link to a dataset already seen
            return [{}, "SOFT_LINK", seen[obj.id]]
        seen[obj.id] = rel
        if obj.ndim == 0 or obj.dtype.kind in "OSU" and obj.ndim == 1 and len(obj) < 2:
            return [attrs, "RAW", _jsonable(obj[()])]
        if obj.dtype.kind not in "biufc":
            if obj.dtype.kind in "OSU":
                return [attrs, "RAW", _jsonable(obj[()])]
            self.not_replayable[rel] = f"dtype {obj.dtype} is not numeric"
            return None
        name = rel.lstrip("/")
        self.streams[name] = ArchivedStream(
            self, StreamDefinition(name, "numeric", obj.dtype.str, tuple(obj.shape[1:])), obj)
        return [attrs, "STREAM", name]

    # ---- the live-Scan surface -------------------------------------------------------------
    session = property(lambda self: self.identity.get("session"))
    name = property(lambda self: self.identity.get("name"))
    number = property(lambda self: self.identity.get("number"))

    def update(self, block: bool = True, timeout: float | None = None) -> bool:
        return False  # an archived scan never changes

    def cursor(self, names=None, start=0, raw_chunks: bool = False) -> ArchivedCursor:
        names = list(self.streams) if names is None else names
        unknown = [n for n in names if n not in self.streams]
        if unknown:
            raise KeyError(f"{self.key} has no stream {unknown}; it has {sorted(self.streams)}")
        return ArchivedCursor([self.streams[n] for n in names], start)

    def close(self) -> None:
        """Let go of the file, and of the scan files its links led to: h5py's close of a
        file leaves those open while a dataset of theirs lives, and this process could not
        then open them another way (h5py's defaults after a scan's SWMR read, say)."""
        for stream in self.streams.values():
            while stream.dataset.id.valid:  # as h5py's File.close() closes its objects
                h5py.h5i.dec_ref(stream.dataset.id)
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<ArchivedScan {self.path}::{self.entry_name} {len(self.streams)} streams>"


def _text(group, name: str) -> str | None:
    if name in group and isinstance(group[name], h5py.Dataset) and group[name].ndim == 0:
        return str(_jsonable(group[name][()]))
    return None


def open_scan(path: str, entry: str | None = None) -> ArchivedScan:
    """An archived scan (entry default: the file's @default, else its only/first NXentry)."""
    p = Path(path)
    if not p.exists():
        raise ArchiveError(f"{path}: no such file")
    if not h5py.is_hdf5(p):
        raise ArchiveError(f"{path}: not an HDF5 file")
    h5 = open_h5(str(p))  # a scan still being written is read in SWMR mode
    entries = [n for n in h5 if isinstance(h5[n], h5py.Group)
               and _jsonable(h5[n].attrs.get("NX_class")) == "NXentry"]
    if not entries:
        h5.close()
        raise ArchiveError(f"{path}: not a NeXus file (no NXentry group at its root)")
    if entry is None:
        default = _jsonable(h5.attrs.get("default"))
        entry = default if default in entries else entries[0]
    if entry not in entries:
        h5.close()
        raise ArchiveError(f"{path}: no entry {entry!r} (entries: {', '.join(entries)})")
    return ArchivedScan(str(p), entry, h5)
