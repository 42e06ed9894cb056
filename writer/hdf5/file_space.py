"""Where a file's bytes go: its datasets' stored data, HDF5's metadata, and the rest (room left
behind by rewritten chunks, padding): :func:`file_space`.

HDF5 reports a dataset's stored bytes (``get_storage_size``) but not how much of the file its
own metadata takes. That is measured here without guessing: the same objects written again by
bare h5py into a new file in one go (the groups and their attributes, every dataset made as
the writer makes it, with its creation properties: shape, chunks, filters, fill value, and
its stored chunks copied as they are); what that file holds outside its datasets' storage is
the metadata. It costs the file's size in I/O: for benchmarks and tests, not for a running
writer.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py

__all__ = ["FileSpace", "file_space", "stored_bytes"]


@dataclass(frozen=True)
class FileSpace:
    size: int  #: the file's size in bytes
    stored: int  #: bytes of its datasets' stored data (chunks as stored, contiguous data)
    metadata: int  #: bytes HDF5's metadata takes for the same objects written in one go

    @property
    def outside(self) -> int:
        """Bytes in neither: left behind by rewrites, free space, padding."""
        return self.size - self.stored - self.metadata

    @property
    def outside_share(self) -> float:
        return self.outside / self.size if self.size else 0.0


def stored_bytes(h5: h5py.Group) -> int:
    """Stored bytes of every dataset under ``h5`` (virtual datasets hold none)."""
    total = 0

    def visit(_name, obj):
        nonlocal total
        if isinstance(obj, h5py.Dataset) and not obj.is_virtual:
            total += obj.id.get_storage_size()
    h5.visititems(visit)
    return total


def file_space(path, scratch_dir=None) -> FileSpace:
    """The space of the HDF5 file ``path`` (opened read-only, SWMR: it may be being
    written); the copy measuring the metadata goes in ``scratch_dir`` (default: the
    system's temporary folder) and is deleted. External links are not followed."""
    with tempfile.TemporaryDirectory(dir=scratch_dir, prefix="file-space-") as tmp:
        copy = Path(tmp) / "copy.h5"
        with h5py.File(path, "r", swmr=True, locking=False) as src, \
                h5py.File(copy, "w", libver="latest") as dst:
            _rewrite(src, dst)
            stored = stored_bytes(src)
        with h5py.File(copy, "r") as dst:
            metadata = os.path.getsize(copy) - stored_bytes(dst)
    return FileSpace(size=os.path.getsize(path), stored=stored, metadata=metadata)


def _rewrite(src: h5py.Group, dst: h5py.Group) -> None:
    """Write ``src``'s objects again under ``dst`` the way a writer does, in one go."""
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for name in src:
        link = src.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            dst[name] = link
            continue
        obj = src[name]
        if isinstance(obj, h5py.Group):
            _rewrite(obj, dst.create_group(name))
            continue
        dcpl = obj.id.get_create_plist()
        if obj.is_virtual or obj.chunks is None:
            h5py.h5o.copy(src.id, name.encode(), dst.id, name.encode())
            continue
        space = h5py.h5s.create_simple(obj.shape, tuple(h5py.h5s.UNLIMITED if m is None else m
                                                        for m in obj.maxshape))
        dsid = h5py.h5d.create(dst.id, name.encode(), obj.id.get_type(), space, dcpl=dcpl)
        for key, value in obj.attrs.items():
            h5py.Dataset(dsid).attrs[key] = value
        for i in range(obj.id.get_num_chunks()):
            info = obj.id.get_chunk_info(i)
            mask, data = obj.id.read_direct_chunk(info.chunk_offset)
            dsid.write_direct_chunk(info.chunk_offset, data, filter_mask=mask)
