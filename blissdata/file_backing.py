"""Reading, from HDF5 files, the points Redis no longer holds.

The writer publishes per stream `{"file", "dataset", "points"}` once points are durable; the
memory tracker may then trim them from Redis. Readers get them from the file without noticing:
same values, same dtype. Files are opened once per DataStore (reader) and reused, read-only
with HDF5 locking off, so they can be read while the writer still writes them.

`references` streams (frames a detector stored in its own files): readers get the frames;
the reference files are opened the same way (relative paths start at the scan file's folder).
"""

from __future__ import annotations

import json
import os
import threading

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters for reading)
import numpy as np

from .exceptions import BlissdataError, IndexNoMoreThereError
from .point_shapes import varying_points


class DataFileError(BlissdataError, OSError):
    """A file that should hold trimmed points is missing, moved or unreadable."""


class FileCache:
    """Open HDF5 files of one reader (thread-safe)."""

    def __init__(self):
        self._files: dict[str, h5py.File] = {}
        # datasets stay open: HDF5 keeps a chunk cache per open dataset, so reading points
        # one by one does not decompress the same chunk again each time
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self._lock = threading.Lock()

    def dataset(self, path: str, name: str, min_length: int = 0) -> h5py.Dataset:
        """`path`:`name`, reopened if this handle shows fewer than `min_length` points (the
        writer has flushed more since we opened it)."""
        with self._lock:
            dset = self._datasets.get((path, name))
            if dset is not None and dset.shape[0] >= min_length:
                return dset
            f = self._files.get(path)
            if f is not None and dset is None and name in f and f[name].shape[0] >= min_length:
                dset = self._datasets[(path, name)] = f[name]
                return dset
            if f is not None:
                self._forget(path)
            try:
                f = self._files[path] = h5py.File(path, "r", locking=False)
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
            return dset

    def _forget(self, path: str) -> None:
        for key in [k for k in self._datasets if k[0] == path]:
            del self._datasets[key]
        self._files.pop(path).close()

    def close(self) -> None:
        with self._lock:
            self._datasets.clear()
            for f in self._files.values():
                f.close()
            self._files.clear()


def lost_ranges(raw) -> list[list[int]]:
    return json.loads(raw) if raw else []


def read_points(stream, start: int, stop: int, backing: dict | None, lost: list):
    """Points [start, stop) of `stream` from the file the writer marked."""
    if backing is None or backing["points"] < stop:
        covered = 0 if backing is None else backing["points"]
        detail = [r for r in lost if r[0] < stop and r[1] > start]
        why = (f"; lost (trimmed before any file held them): {detail}" if detail else
               f"; the file holds [0, {covered})" if backing else "; no file holds this stream")
        raise IndexNoMoreThereError(
            f"stream {stream.name!r} of scan {stream._scan.key}: points [{start}, {stop}) are no "
            f"more in Redis{why}")
    dset = stream._scan._store._files.dataset(backing["file"], backing["dataset"], stop)
    data = dset[start:stop]
    definition = stream.definition
    if definition.encoding == "json":
        return [json.loads(v) for v in data]
    if definition.varying:  # each point cut to its own shape (point_shapes.py)
        return varying_points(dset, start, data)
    return data


def reference_frames(stream, references: list) -> np.ndarray:
    """The frames `references` point to ({"file", "dataset", "index"} each)."""
    folder = os.path.dirname(stream._scan.path)
    files = stream._scan._store._files
    frames = []
    for ref in references:
        path = ref["file"] if os.path.isabs(ref["file"]) else os.path.join(folder, ref["file"])
        dset = files.dataset(path, ref["dataset"], ref["index"] + 1)
        frames.append(dset[ref["index"]])
    return np.stack(frames) if frames else np.empty((0,))
