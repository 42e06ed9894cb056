"""An h5py-like, read-only view of scans, built from their mapping: usable before the file
exists, while it is written, and after (then it is the file itself).

    f = File(data_store, "/data/id00/sample/sample.h5")     # every scan of that file
    for value in f["/measurement/diode"]: ...              # entry-relative (last scan)
    images = f["/1.1/instrument/my_camera/data"][0:10]     # or with the entry name

Streamed datasets read through the Stream API (Redis for recent points, the file for trimmed
ones); iterating one follows the scan live until its stream ends. RAW leaves, titles, times
and attributes are what h5py reads from the writer's file (``bytes`` for text, with
``.asstr()``; the same dtypes and shapes), live as archived: they are stored the writer's way
(`blissdata.h5values`) in an in-memory HDF5 file and read from there. SOFT_LINKs resolve,
EXTERNAL_LINKs open the other file.
"""

from __future__ import annotations

import itertools
import json
import os

import h5py
import hdf5plugin  # noqa: F401  (registers the compression filters for reading)
import numpy as np

from . import lost_points
from .archive import ArchivedScan
from .exceptions import ScanNotFoundError
from .file_backing import open_h5
from .h5values import set_attrs, write_value

_memory_files = itertools.count()


def _entry_order(name: str):
    """Entries "<scan number>.<n>" in scan order; other names after them."""
    number, _, sub = name.partition(".")
    return (0, int(number), sub) if number.isdigit() else (1, 0, name)


class Dataset:
    def __init__(self, name: str, attrs: dict, stream=None, value=None):
        self.name, self.attrs = name, dict(attrs)
        self._stream, self._value = stream, value

    @property
    def shape(self) -> tuple:
        if self._stream is None:
            return np.shape(self._value)
        return (len(self._stream), *self._stream.shape)

    @property
    def dtype(self):
        if self._stream is None:
            return np.asarray(self._value).dtype
        return self._stream.dtype if self._stream.dtype is not None else np.dtype(object)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getitem__(self, item):
        whole = item is Ellipsis or (isinstance(item, tuple) and item == ())
        if self._stream is None:
            return self._value if whole else np.asarray(self._value)[item]
        if whole:
            return self._stream[:]
        if isinstance(item, tuple):
            first, rest = item[0], item[1:]
            data = self._stream[first]
            return np.asarray(data)[(slice(None), *rest)] if isinstance(first, slice) \
                else np.asarray(data)[rest]
        return self._stream[item]

    def __iter__(self):
        if self._stream is None:
            yield from np.asarray(self._value)
        else:
            yield from self._stream  # follows the scan until the stream ends

    def __repr__(self):
        return f'<blissdata Dataset "{self.name}": shape {self.shape}, type "{self.dtype}">'


class Group:
    def __init__(self, name: str, attrs: dict, children: dict, resolve):
        self.name, self.attrs = name, dict(attrs)
        self._children, self._resolve = children, resolve

    def keys(self):
        return list(self._children)

    def __iter__(self):
        return iter(self._children)

    def __len__(self):
        return len(self._children)

    def __contains__(self, path) -> bool:
        try:
            self[path]
            return True
        except KeyError:
            return False

    def items(self):
        return [(k, self[k]) for k in self._children]

    def values(self):
        return [self[k] for k in self._children]

    def get(self, path, default=None):
        try:
            return self[path]
        except KeyError:
            return default

    def __getitem__(self, path: str):
        if path.startswith("/"):
            return self._resolve(path)
        node = self
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, Group) or part not in node._children:
                raise KeyError(f"{path!r} is not in {self.name}")
            node = node._children[part]() if callable(node._children[part]) else \
                node._children[part]
        return node

    def __repr__(self):
        return f'<blissdata Group "{self.name}" ({len(self)} members)>'


class File(Group):
    """Every scan whose file is `path` (oldest first, entries "<number>.1"); with
    `entry`, only that one. Paths that do not start with an entry name are taken inside the
    default entry (`entry`, else the most recent scan). Once no scan of that file is left in
    Redis, the file itself is opened (read-only, h5py)."""

    def __init__(self, data_store, path: str, entry: str | None = None):
        self.filename = os.path.abspath(path)
        self._store = data_store
        scans = self._scans_of(self.filename)
        self._h5 = None
        self._memory_file = None
        if scans:
            entries = {scan.info.get("entry_name") or f"{scan.number}.1": scan
                       for scan in scans}
        elif os.path.exists(self.filename):  # archived: the file's entries, in scan order
            self._h5 = open_h5(self.filename)
            entries = {name: None for name in sorted(self._h5, key=_entry_order)}
        else:
            raise FileNotFoundError(f"no scan of {self.filename} in Redis at "
                                    f"{data_store.masked_url} and no such file")
        if entry is not None and entry not in entries:
            self.close()
            raise KeyError(f"no entry {entry!r} in {self.filename} (entries: {list(entries)})")
        self._entries = entries
        self._default = entry or (list(entries)[-1] if entries else None)
        children = {name: (lambda n=name: self._resolve_abs("/" + n)) for name in entries}
        super().__init__("/", {}, children, self._resolve_abs)

    def _scans_of(self, path: str) -> list:
        store = self._store
        scan_keys = store.search_scans()
        pipe = store.redis.pipeline(transaction=False)
        for key in scan_keys:
            pipe.hget(key, "identity")
        found = []
        for key, raw in zip(scan_keys, pipe.execute()):
            if raw and os.path.abspath(json.loads(raw)["path"]) == path:
                try:
                    found.append(store.load_scan(key))
                except ScanNotFoundError:
                    pass
        return found

    def _entry(self, name: str) -> Group:
        scan = self._entries[name]
        scan.reload()
        mapping = scan.info.get("mapping") or [{"NX_class": "NXentry"}, {
            "measurement": [{"NX_class": "NXcollection"},
                            {n.replace(":", "_"): [{}, "STREAM", n] for n in scan.streams}]}]
        root = f"/{name}"
        group = self._build(root, mapping, scan, root)
        for field in ("title", "start_time", "end_time", "end_reason"):
            if field in scan.info and field not in group._children:
                text = str(scan.info[field])  # the times and end reason: fixed-length, as
                value = text if field == "title" else np.bytes_(text.encode())  # the writer's
                group._children[field] = self._stored(f"{root}/{field}", value, {})
        return group

    # ---- static values, as h5py reads them from the file ----------------------------------
    def _memory(self) -> h5py.File:
        if self._memory_file is None:
            self._memory_file = h5py.File(f"blissdata-h5api-{next(_memory_files)}.h5", "w",
                                          driver="core", backing_store=False)
        return self._memory_file

    def _stored(self, path: str, value, attrs: dict) -> h5py.Dataset:
        """The h5py dataset the writer would make of `value` at `path` (stored once)."""
        memory = self._memory()
        if path not in memory:
            parent, name = path.rsplit("/", 1)
            write_value(memory.require_group(parent or "/").id, name, value, attrs)
        return memory[path]

    def _attrs_as_read(self, attrs: dict) -> dict:
        if not attrs:
            return {}
        scratch = self._memory().create_group(f"attrs-{next(_memory_files)}")
        try:
            set_attrs(scratch, attrs, fresh=True)
            return dict(scratch.attrs)
        finally:
            del self._memory()[scratch.name]

    def _build(self, path: str, node, scan, root: str):
        attrs = node[0]
        if len(node) == 2:
            children = {name: (lambda p=f"{path}/{name}", c=child: self._build(p, c, scan, root))
                        for name, child in node[1].items()}
            return Group(path, self._attrs_as_read(attrs), children, self._resolve_abs)
        kind, value = node[1], node[2]
        if kind == "RAW":
            return self._stored(path, value, attrs)
        if kind == "STREAM":
            return Dataset(path, self._attrs_as_read(attrs), stream=scan.streams[value])
        if kind == "SOFT_LINK":
            return self._resolve_abs(root + value)
        with open_h5(os.path.join(os.path.dirname(self.filename),
                                  value["file"])) as f:  # EXTERNAL_LINK
            return Dataset(path, attrs, value=f[value["path"]][()])

    def _resolve_abs(self, path: str):
        parts = [p for p in path.split("/") if p]
        if self._h5 is not None:
            if parts and parts[0] not in self._entries and self._default is not None:
                parts.insert(0, self._default)  # entry-relative, as for a live scan
            return self._with_losses_guarded(self._h5["/" + "/".join(parts)], parts)
        if not parts:
            return self
        if parts[0] in self._entries:
            return self._entry(parts[0])["/".join(parts[1:])] if parts[1:] else \
                self._entry(parts[0])
        if self._default is None:
            raise KeyError(f"{path!r}: no scan in {self.filename}")
        return self._entry(self._default)["/".join(parts)]

    def _with_losses_guarded(self, obj, parts: list):
        """A dataset of the file as h5py gives it, unless its stream lost points in Redis
        before the writer stored them (fill values in the file): then read through the
        archived stream, which raises IndexNoMoreThereError for them."""
        if not isinstance(obj, h5py.Dataset) or not parts or parts[0] not in self._entries:
            return obj
        entry = self._h5[parts[0]]
        if not lost_points.recorded_in(entry):
            return obj
        for stream in ArchivedScan(self.filename, parts[0], self._h5).streams.values():
            if stream.lost and stream.dataset.id == obj.id:
                return Dataset(obj.name, obj.attrs, stream=stream)
        return obj

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        if self._memory_file is not None:
            self._memory_file.close()
            self._memory_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
