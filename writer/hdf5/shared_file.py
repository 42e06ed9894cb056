"""The shared file of a session (``sample.h5``): one external link per scan to the scan's
own file (``sample/sample_3.1.h5``), changed only by a new version renamed over it, and
carrying the "open for SWMR writing" flags while a scan it links to is being written.

Why this layout: see docs/files.md."""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import h5py

from .superblock import SWMR_WRITING_FLAGS, set_status_flags, status_flags


# ---- the shared file: one external link per scan -------------------------------------------
_master_locks: dict[Path, threading.Lock] = {}
_master_locks_guard = threading.Lock()


@contextmanager
def _master_lock(master: Path):
    """One writer at a time rewrites a shared file: threads of this process (a lock per
    path), other processes (flock on a lock file next to the scans' files)."""
    with _master_locks_guard:
        local = _master_locks.setdefault(master, threading.Lock())
    with local:
        lock_path = scans_folder(master) / f".{master.name}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@contextmanager
def _not_being_written(master: Path):
    """OSError if another program has `master` open for writing (HDF5's exclusive lock);
    programs reading it (HDF5's shared lock) are no obstacle: the file is replaced, never
    changed where it lies."""
    try:
        fd = os.open(master, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(f"cannot add a scan to {master}: it is locked by another program "
                          f"that has it open for writing") from None
        yield
    finally:
        os.close(fd)


def scans_folder(master: Path) -> Path:
    """Where the scans of a shared file have their own files: `<folder>/<stem>/`."""
    return master.parent / master.stem


def scan_file_in(master: Path, entry_name: str) -> Path:
    """The own file of scan entry `entry_name` of shared file `master`:
    ``sample.h5`` -> ``sample/sample_3.1.h5``."""
    return scans_folder(master) / f"{master.stem}_{entry_name}{master.suffix or '.h5'}"


def entry_in(master: Path, entry_name: str) -> str | None:
    """How `master` holds `entry_name`: "link" (an external link, this writer's layout),
    "group" (written by an older writer), or None (not there, or no such file)."""
    if not master.exists():
        return None
    with _not_being_written(master), \
            h5py.File(master, "r", locking=False, swmr=True) as f:
        link = f.get(entry_name, getlink=True)
    if link is None:
        return None
    return "link" if isinstance(link, h5py.ExternalLink) else "group"


def link_entry(master: Path, entry_name: str, scan_file: Path) -> None:
    """Make `master:/<entry_name>` an external link to `scan_file:/<entry_name>`.

    The shared file is never changed where it lies: a new version is written beside it and
    renamed over it (atomic), so a program reading the old version keeps a complete file (it
    sees the new scan once it opens the file again) and a crash leaves the old or the new
    one, whole. A file whose entries are groups (written by an older writer) cannot be
    copied cheaply: the link is then added in place.

    While a scan it links to is being written, the shared file carries the same "open for
    writing in SWMR mode" flags as that scan's file (:func:`sync_master_flags`)."""
    target = os.path.relpath(scan_file, master.parent)
    with _master_lock(master):
        if entry_in(master, entry_name) == "link":
            _sync_master_flags(master)  # a scan resumed: its file is written again
            return
        with _not_being_written(master):
            legacy = master.exists() and _has_groups(master)
        if legacy:
            with h5py.File(master, "r+", locking=False) as f:
                f[entry_name] = h5py.ExternalLink(target, f"/{entry_name}")
                f.attrs["default"] = entry_name
            return
        tmp = _version_beside(master)
        try:
            with h5py.File(tmp, "w", libver="latest") as new:
                if master.exists():
                    with h5py.File(master, "r", locking=False, swmr=True) as old:
                        new.attrs.update(old.attrs)
                        for name in old:
                            link = old.get(name, getlink=True)
                            new[name] = h5py.ExternalLink(link.filename, link.path)
                else:
                    new.attrs.update({"NX_class": "NXroot", "creator": "blisswriter",
                                      "HDF5_Version": h5py.version.hdf5_version,
                                      "h5py_version": h5py.version.version})
                new.attrs["file_name"] = str(master)
                new[entry_name] = h5py.ExternalLink(target, f"/{entry_name}")
                new.attrs["default"] = entry_name
            set_status_flags(tmp, _master_flags_wanted(tmp, master.parent))
            os.replace(tmp, master)
        finally:
            if tmp.exists():
                tmp.unlink()


def sync_master_flags(master: Path) -> None:
    """Give the shared file `master` the "open for writing in SWMR mode" flags while one of
    the scans it links to is being written, and none once none is.

    Why: a plain ``h5py.File(master, "r")`` (what silx tries first, and h5py's default) opens
    a shared file without these flags, but then cannot follow its link into a scan file
    being written: HDF5 refuses a non-SWMR open of such a file ("already open for write").
    With the flags, that plain open is refused at once, and silx (``silx.io.open``, ``silx
    view``) then opens the shared file with ``swmr=True``, which HDF5 passes on to the files
    its links lead to: the running scan's entry and data are there. The flags change by a
    new version renamed over the file, as every change of the shared file."""
    with _master_lock(master):
        _sync_master_flags(master)


def _sync_master_flags(master: Path) -> None:
    have = status_flags(master)
    if have is None:  # no shared file, or one of an older writer (no flags in its format)
        return
    want = _master_flags_wanted(master, master.parent)
    if have == want:
        return
    tmp = _version_beside(master)
    try:
        shutil.copyfile(master, tmp)
        set_status_flags(tmp, want)
        os.replace(tmp, master)
    except OSError:
        if want:
            raise
        # no room for a new version (a full disk failed the scan): the mark is cleared in
        # place, one write within the superblock's first sector, so that plain opens work
        set_status_flags(master, 0)
    finally:
        if tmp.exists():
            tmp.unlink()


def _master_flags_wanted(version: Path, folder: Path) -> int:
    """SWMR_WRITING_FLAGS if a scan file that `version` (a shared file, or its new version
    before the rename) links to is being written, else 0."""
    with h5py.File(version, "r", locking=False, swmr=True) as f:
        links = [f.get(name, getlink=True) for name in f]
    files = {link.filename for link in links if isinstance(link, h5py.ExternalLink)}
    return SWMR_WRITING_FLAGS if any(status_flags(folder / name) for name in files) else 0


def _version_beside(master: Path) -> Path:
    return master.with_name(f".{master.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def _has_groups(master: Path) -> bool:
    with h5py.File(master, "r", locking=False, swmr=True) as f:
        return any(not isinstance(f.get(n, getlink=True), h5py.ExternalLink) for n in f)
