"""Frames a detector stored in its own HDF5 files, shown in the NeXus entry as a virtual
dataset: the points of a `references` stream are {"file", "dataset", "index"}.

The virtual dataset is (re)built at each flush from every reference so far (building one is
metadata only); consecutive indices of one source dataset become one mapping. Source files are
checked against the data roots before they are referenced.

A scan file written in SWMR mode cannot get a new object once SWMR writing has started, and
a virtual dataset's mappings cannot be changed once it exists. So there (``own_file``), the
virtual dataset lives in a small file of its own beside the scan's file, written whole under
a temporary name and renamed over the previous version at each flush: a reader has the old
version or the new one, never a file being written. The scan's file holds, from the start,
an external link to it (docs/files.md).
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np


#: root attribute of a virtual dataset's own file: the name of the scan file linking to it
OWN_FILE_ATTR = "references_of"


class ReferencesAppender:
    """The same surface as DatasetAppender (append, flush, npoints, pending_bytes, dataset)."""

    pending_bytes = 0

    def __init__(self, group: h5py.Group, name: str, scan_file: Path, check_target,
                 attrs=None, references=None, definition=None, base: Path | None = None,
                 own_file: Path | None = None):
        self._group, self._name = group, name
        # the virtual dataset in a file of its own, linked from group[name] (SWMR)
        self._own_file = Path(own_file) if own_file is not None else None
        if self._own_file is not None and group.get(name, getlink=True) is None:
            # absolute: nexusformat resolves a relative name from the file it opened (the
            # shared file), HDF5 from the file holding the link; HDF5 also looks for the
            # name in the folder of the file holding the link when the path does not exist
            # (data moved), nexusformat does not
            group[name] = h5py.ExternalLink(str(self._own_file.resolve()), "/" + name)
        # frames of a declared dtype and shape (a blissdata 2 lima stream): the virtual
        # dataset is built from the declaration, whether the detector's files exist yet or not
        self._declared = None
        if definition is not None and definition.dtype is not None:
            self._declared = (tuple(definition.shape), np.dtype(definition.dtype))
        self._scan_file = Path(scan_file)  # the file holding the virtual dataset
        # relative reference paths start there (the scan's path: see blissdata.file_backing)
        self._base = Path(base) if base is not None else self._scan_file.parent
        self._check_target = check_target  # raises PathRefused for a file outside data roots
        self._attrs = dict(attrs or {})
        self._refs: list[tuple[str, str, int]] = list(references or [])
        self._built = -1
        self._source_meta: dict[tuple[str, str], tuple] = {}

    @classmethod
    def open(cls, dataset: h5py.Dataset, scan_file, check_target,
             definition=None, base: Path | None = None) -> "ReferencesAppender":
        """Resume on a virtual dataset written before a restart."""
        refs = []
        folder = Path(scan_file).parent
        for vs in dataset.virtual_sources():
            (lo, *_), (hi, *_) = vs.vspace.get_select_bounds()
            (src_lo, *_), _ = vs.src_space.get_select_bounds()
            file = vs.file_name
            if base is not None and not os.path.isabs(file):  # back to the references' base
                file = os.path.relpath(folder / file, base)
            refs.extend((file, vs.dset_name, src_lo + k) for k in range(hi - lo + 1))
        group, name = dataset.parent, dataset.name.rsplit("/", 1)[1]
        self = cls(group, name, scan_file, check_target, dict(dataset.attrs), refs, definition,
                   base)
        self._built = len(refs)
        return self

    @classmethod
    def open_own_file(cls, group: h5py.Group, name: str, own_file: Path, scan_file,
                      check_target, keep: int, definition=None,
                      base: Path | None = None) -> "ReferencesAppender":
        """Resume on a virtual dataset in its own file (its first `keep` points): read from
        that file directly (through the link, this process would keep it open for writing)."""
        own_file = Path(own_file)
        for left in own_file.parent.glob(f".{glob.escape(own_file.name)}.*.tmp"):  # killed
            left.unlink(missing_ok=True)  # while writing a version
        if not own_file.exists():  # killed before its first flush
            return cls(group, name, scan_file, check_target, definition=definition, base=base,
                       own_file=own_file)
        with h5py.File(own_file, "r", locking=False) as f:
            found = cls.open(f[name], own_file, check_target, definition, base)
        self = cls(group, name, scan_file, check_target, found._attrs, found._refs[:keep],
                   definition, base, own_file)
        self._built = -1 if keep < len(found._refs) else len(self._refs)
        return self

    @property
    def npoints(self) -> int:
        return len(self._refs)

    own_file = property(lambda self: self._own_file)

    @property
    def dataset(self):
        if self._own_file is not None:  # not through the link (see open_own_file)
            return None
        return self._group.get(self._name)

    def append(self, points: list) -> None:
        for p in points:
            file = p["file"]
            target = Path(file) if os.path.isabs(file) else self._base / file
            self._check_target(str(target))
            self._refs.append((file, p["dataset"], int(p["index"])))

    def _meta(self, file: str, dataset: str):
        if self._declared is not None:
            return self._declared
        key = (file, dataset)
        if key not in self._source_meta:
            path = file if os.path.isabs(file) else str(self._base / file)
            try:
                with h5py.File(path, "r", locking=False) as f:
                    d = f[dataset]
                    self._source_meta[key] = (d.shape[1:], d.dtype)
            except (OSError, KeyError) as exc:
                raise ValueError(f"referenced frames {file}::{dataset} cannot be read: "
                                 f"{exc}") from None
        return self._source_meta[key]

    def flush(self, final: bool = False) -> int:  # same signature as DatasetAppender
        if self._built == len(self._refs) or not self._refs:
            return self._built if self._built >= 0 else 0
        shape, dtype = self._meta(*self._refs[0][:2])
        # declared frames (lima): extendable as blisswriter 3.0.0 writes them
        maxshape = (None, *shape) if self._declared is not None else None
        layout = h5py.VirtualLayout(shape=(len(self._refs), *shape), dtype=dtype,
                                    maxshape=maxshape)
        i = 0
        while i < len(self._refs):  # one mapping per run of consecutive source indices
            file, dset, first = self._refs[i]
            j = i + 1
            while (j < len(self._refs) and self._refs[j][:2] == (file, dset)
                   and self._refs[j][2] == first + (j - i)):
                j += 1
            src_shape, src_dtype = self._meta(file, dset)
            if src_shape != shape:
                raise ValueError(f"referenced frames {file}::{dset} have shape {src_shape}, "
                                 f"the earlier ones {shape}")
            if not os.path.isabs(file):  # HDF5 looks for it from the virtual dataset's folder
                file = os.path.relpath(self._base / file, self._vds_folder)
            source = h5py.VirtualSource(file, dset, shape=(first + (j - i), *shape))
            layout[i:j] = source[first:first + (j - i)]
            i = j
        if self._own_file is not None:
            self._replace_own_file(layout)
        else:
            if self._name in self._group:
                del self._group[self._name]
            ds = self._group.create_virtual_dataset(self._name, layout, fillvalue=0)
            ds.attrs.update(self._attrs)
        self._built = len(self._refs)
        return self._built

    @property
    def _vds_folder(self) -> Path:
        return (self._own_file or self._scan_file).parent

    def _replace_own_file(self, layout) -> None:
        """The new version of the virtual dataset's own file, renamed over the old one."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self._own_file.name}.", suffix=".tmp",
                                   dir=self._own_file.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w", locking=False) as f:
                f.attrs[OWN_FILE_ATTR] = self._scan_file.name  # (writer/commands/rewrite.py)
                ds = f.create_virtual_dataset(self._name, layout, fillvalue=0)
                ds.attrs.update(self._attrs)
            os.replace(tmp, self._own_file)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
