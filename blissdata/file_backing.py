"""Reading, from HDF5 files, the points Redis no longer holds.

The writer publishes per stream `{"file", "dataset", "points"}` once points are durable; the
memory tracker may then trim them from Redis. Readers get them from the file without noticing:
same values, same dtype. A file is open only during the read that needs it, read-only, with
HDF5's default locking and in SWMR mode (it opens any file, finished or still written); every
read returns the points asked for or raises DataFileError saying which are missing.

`references` streams (frames a detector stored in its own files): readers get the frames;
the reference files are opened the same way (relative paths start at the scan file's folder).
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters for reading)
import numpy as np

from . import lost_points
from .exceptions import BlissdataError, PointsGoneError
from .json_points import PointsNotThere, json_points
from .point_shapes import shapes_dataset, varying_points


class DataFileError(BlissdataError, OSError):
    """A file that should hold trimmed points is missing, moved or unreadable."""


def open_h5(path: str, swmr_first: bool = False) -> h5py.File:
    """Open an HDF5 file to read it, whether or not a writer is still appending to it, as
    h5py and silx would: a plain open with HDF5's default locking (a finished file), else
    ``swmr=True`` (HDF5 opens a file being written in SWMR mode only so). `swmr_first`: try
    ``swmr=True`` first (it opens any file), for reads that open several files at once: the
    files HDF5 opens itself behind a link or a virtual dataset get the flags of the file
    they are reached from, and they must agree with those of our own opens.

    HDF5 opens a file once per process, and every open must agree on these flags: when
    this process already has the file open otherwise (a user's own ``h5py.File``, perhaps
    with ``locking=False``), that way is used. A file another program holds locked for
    writing without SWMR (an older writer's format) is read with HDF5's locking off, as
    before: what the writer published as durable is on disk."""
    tries = [dict(), dict(swmr=True), dict(locking=False), dict(swmr=True, locking=False)]
    if swmr_first:
        tries = [tries[1], tries[0], tries[3], tries[2]]
    for i, flags in enumerate(tries):
        try:
            return h5py.File(path, "r", **flags)
        except OSError as exc:
            if i == len(tries) - 1 or not _try_another_way(exc):
                raise
    raise AssertionError("unreachable")


def _try_another_way(exc: OSError) -> bool:
    text = str(exc)
    return ("already open for write" in text  # being written: SWMR only
            or "not the same for file that is already open" in text or "don't match" in text
            or "unable to lock file" in text)


class FileCache:
    """The HDF5 files one reader (a DataStore) reads trimmed points from (thread-safe).

    A file is open only while a read needs it: the first :meth:`dataset` inside
    ``with cache.in_use():`` opens it (``swmr=True``, see :func:`open_h5`), the end of the
    outermost ``in_use`` closes it. So this process's other opens of the same file (a
    user's ``h5py.File(path, "r")``, ``silx.io.open``, ``nxload``) never meet a handle of
    ours with other flags (HDF5 refuses that), and a finished scan's file is let go as soon
    as it was read. The cost: HDF5 reads a dataset's chunk index again at each open (about
    0.6 ms for 100 chunks), which many small reads of trimmed points pay each time.

    Within one read, a dataset that shows fewer points than asked for is refreshed (SWMR),
    then the file is opened again; what it still does not hold raises DataFileError
    (:func:`read_points` also checks the number of points it read)."""

    def __init__(self):
        self._files: dict[str, h5py.File] = {}
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self._lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def in_use(self):
        """The files opened inside stay open until the outermost ``in_use`` ends."""
        with self._lock:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self._close_all()

    def dataset(self, path: str, name: str, min_length: int = 0) -> h5py.Dataset:
        """`path`:`name` showing at least `min_length` points (inside :meth:`in_use`)."""
        with self._lock:
            if self._depth == 0:
                raise RuntimeError("FileCache.dataset() outside `with cache.in_use():`")
            dset = self._datasets.get((path, name))
            if dset is not None and _length(dset, min_length) >= min_length:
                return dset
            if path in self._files:  # stale: open the file again
                self._forget(path)
            try:
                f = self._files[path] = open_h5(path, swmr_first=True)
            except FileNotFoundError:
                self._files.pop(path, None)
                raise DataFileError(f"file {path} should hold data of this scan but does "
                                    f"not exist (deleted or moved?)") from None
            except OSError as exc:
                self._files.pop(path, None)
                raise DataFileError(f"file {path} cannot be read: {exc}") from None
            if name not in f:
                raise DataFileError(f"file {path} has no dataset {name}")
            dset = self._datasets[(path, name)] = f[name]
            length = _length(dset, min_length)
            if length < min_length:
                raise DataFileError(f"file {path} dataset {name} holds {length} points, "
                                    f"{min_length} were published as written")
            return dset

    def refresh(self, path: str, name: str) -> None:
        """Forget what HDF5 knows of `path` (the next read opens it again)."""
        with self._lock:
            if path in self._files:
                self._forget(path)

    def _forget(self, path: str) -> None:
        for key in [k for k in self._datasets if k[0] == path]:
            del self._datasets[key]
        self._files.pop(path).close()

    def _close_all(self) -> None:
        self._datasets.clear()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def close(self) -> None:
        with self._lock:
            self._close_all()


def _length(dset: h5py.Dataset, wanted: int) -> int:
    """The dataset's length, refreshed from the file (SWMR) when it shows fewer than
    `wanted` points."""
    if dset.shape[0] < wanted and dset.file.swmr_mode:
        dset.refresh()
    return dset.shape[0]


#: a read that failed is tried again after these pauses (s): a handle may describe an older
#: state of the file, and a writer resuming a scan reopens its file (for a few tens of ms it
#: is then not yet in SWMR mode and readers cannot open it)
READ_RETRY_PAUSES = (0.0, 0.05, 0.2, 0.5, 1.0)


def lost_ranges(raw) -> list[list[int]]:
    return lost_points.ranges_of(raw)


def read_points(stream, start: int, stop: int, backing: dict | None, lost: list):
    """Points [start, stop) of `stream` from the file the writer marked. Points in a lost
    range raise even when the file covers them: the writer filled them with fill values."""
    detail = lost_points.overlapping(lost, start, stop)
    if detail or backing is None or backing["points"] < stop:
        covered = 0 if backing is None else backing["points"]
        why = (f"; lost (trimmed before any file held them): {detail}" if detail else
               f"; the file holds [0, {covered})" if backing else "; no file holds this stream")
        raise PointsGoneError(
            f"stream {stream.name!r} of scan {stream.scan.key}: points [{start}, {stop}) are no "
            f"more in Redis{why}", stream.name, start, stop)
    files = stream.scan.store.files
    definition = stream.definition
    if definition.encoding == "json":
        return read_json_range(files, backing["file"], backing["dataset"], start, stop)
    data = read_range(files, backing["file"], backing["dataset"], start, stop)
    if definition.varying:  # each point cut to its own shape (point_shapes.py)
        dset = files.dataset(backing["file"], backing["dataset"], stop)
        shapes = shapes_dataset(dset)
        if shapes is not None:
            _length(shapes, stop)  # refreshed (SWMR) if it shows fewer shapes than points
        return varying_points(dset, start, data)
    return data


def read_range(files: FileCache, path: str, name: str, start: int, stop: int):
    """Points [start, stop) of `path`:`name`, all of them or DataFileError naming what is
    missing: never a shorter array. A read that fails is tried again on the file opened
    anew (a handle opened earlier may describe an older state of a file being written)."""
    problem = None
    for pause in (*READ_RETRY_PAUSES, None):
        try:
            data = files.dataset(path, name, stop)[start:stop]
        except DataFileError as exc:
            problem = str(exc)
            if not os.path.exists(path):  # deleted or moved: waiting will not bring it back
                break
        except (OSError, RuntimeError, ValueError) as exc:
            problem = f"file {path} dataset {name}: points [{start}, {stop}) cannot be read: " \
                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        else:
            if len(data) == stop - start:
                return data
            problem = (f"file {path} dataset {name}: read {len(data)} points of [{start}, "
                       f"{stop}); points [{start + len(data)}, {stop}) are missing")
        if pause is None:
            break
        files.refresh(path, name)
        time.sleep(pause)
    raise DataFileError(problem)


def read_json_range(files: FileCache, path: str, name: str, start: int, stop: int) -> list:
    """Points [start, stop) of the json stream in `path`:`name` (blissdata.json_points: the
    texts beside their rows, or older files' strings), all of them or DataFileError."""
    problem = None
    for pause in (*READ_RETRY_PAUSES, None):
        data = read_range(files, path, name, start, stop)
        try:
            return json_points(files.dataset(path, name, stop), start, data, refresh=True)
        except PointsNotThere as exc:  # a handle showing an older state of the file
            problem = str(exc)
        if pause is None:
            break
        files.refresh(path, name)
        time.sleep(pause)
    raise DataFileError(problem)


def reference_frames(stream, references: list) -> np.ndarray:
    """The frames `references` point to ({"file", "dataset", "index"} each)."""
    folder = os.path.dirname(stream.scan.path)
    files = stream.scan.store.files
    frames = []
    for ref in references:
        path = ref["file"] if os.path.isabs(ref["file"]) else os.path.join(folder, ref["file"])
        frames.append(read_range(files, path, ref["dataset"], ref["index"],
                                 ref["index"] + 1)[0])
    return np.stack(frames) if frames else np.empty((0,))
