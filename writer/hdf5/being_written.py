"""Which scans of a file are still being written, for the commands that read finished files
(`validate`, `rewrite`): they refuse such a file with a clear message instead of failing on
HDF5's "already open for write" (and its h5clear advice, dangerous while a writer is alive).

A file HDF5 marks open for writing (the superblock's consistency flags) has a writer at it,
or had one that died: `blisswriter run` resumes that scan and clears the mark. A shared file
(docs/files.md) is itself closed between scans; its entries are external links to the scans'
own files, so those are looked at too. The scan's state is read from the entry's
`writer_status` note, opened the only way HDF5 allows then (``swmr=True``), read only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py


from .superblock import status_flags

#: exit status of `validate` and `rewrite` for a file with a scan still being written
EXIT_BEING_WRITTEN = 3


@dataclass
class ScanBeingWritten:
    file: str  # the scan's own file (the one HDF5 marks open for writing)
    entry: str  # e.g. "3.1"; "" when the file holds no entry yet
    state: str  # the writer's last status in the file ("writing", "idle", ...), or "unknown"

    def message(self, path: str, command: str) -> str:
        scan = f"scan {self.entry}" if self.entry else "its scan"
        where = "" if Path(self.file) == Path(path) else f" ({self.file})"
        return (f"{path}: {scan}{where} is still being written (state {self.state}); "
                f"{command} it once done (`blisswriter status --wait`; a scan whose writer "
                f"died is finished by the next `blisswriter run`)")


def scans_being_written(path) -> list[ScanBeingWritten]:
    """The scans of the HDF5 file `path` (its own, or those its top-level external links
    name) whose file HDF5 marks open for writing. A shared file wears that mark too while
    one of its scans is written (docs/files.md): its links say which."""
    path = Path(path)
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            links = [(name, f.get(name, getlink=True)) for name in f]
    except OSError:
        return _entries_of(path) if status_flags(path) else []
    found = []
    for name, link in links:
        if not isinstance(link, h5py.ExternalLink):
            continue
        target = Path(link.filename)
        if not target.is_absolute():  # HDF5 looks beside the file naming it
            target = path.resolve().parent / target
        if target.is_file() and status_flags(target):
            found.extend(_entries_of(target, only=name))
    own = [name for name, link in links if not isinstance(link, h5py.ExternalLink)]
    if status_flags(path) and (own or not links):
        found.extend(_entries_of(path))
    return found


def _entries_of(path: Path, only: str | None = None) -> list[ScanBeingWritten]:
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            names = [only] if only else list(f)
            found = [ScanBeingWritten(str(path), name, _state(f, name)) for name in names
                     if isinstance(f.get(name), h5py.Group)]
    except (OSError, KeyError):  # not even a SWMR reader gets in: nothing readable yet
        found = []
    return found or [ScanBeingWritten(str(path), only or "", "unknown")]


def _state(f: h5py.File, entry: str) -> str:
    note = f.get(f"{entry}/writer_status/data")
    if not isinstance(note, h5py.Dataset):
        return "unknown"
    raw = note[()]
    try:
        return json.loads(raw.rstrip(b"\0") if isinstance(raw, bytes) else raw)["state"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
