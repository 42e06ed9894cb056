"""The writer's HDF5 files: each scan's own file, opened once per process and written in SWMR
mode (:class:`OpenFiles`); room reserved ahead of the writes (:func:`reserve_space`).

The shared file of a session that links to them: ``shared_file``; the repair of a file left
"open for writing" by a writer killed -9: ``superblock``. Why this layout: docs/files.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from .locks import FileLockedError, WriterLock, try_flock
from .os_errors import os_reason
from .superblock import SWMR_WRITING_FLAGS, clear_write_flags, status_flags

log = logging.getLogger("blisswriter")


_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return fallocate


_fallocate = _load_fallocate()


def reserve_space(fd: int, offset: int, length: int) -> bool:
    """Allocate the disk blocks of bytes [offset, offset + length) of a file without changing
    its size (Linux ``fallocate`` with FALLOC_FL_KEEP_SIZE): writes there can then not fail
    for lack of space. False where the system or file system cannot do it; OSError (ENOSPC)
    when the disk has not that much room."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(code, os.strerror(code))



def _left_open(exc: OSError) -> bool:
    return "already open for write" in str(exc)


@dataclass
class OpenFile:
    path: Path
    h5: h5py.File
    writer_lock: WriterLock
    fd: int  # the data file, for reserve(); holds HDF5's own lock until SWMR writing starts
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0
    reserved_to: int = 0  # the disk blocks up to this offset are held (reserve())

    def reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` of disk beyond the file's end for the writes to come (see
        :func:`reserve_space`); the room not used is given back when the file is closed.
        Room already held is not asked for again (one system call per read otherwise)."""
        start = self.h5.id.get_filesize()
        if start + nbytes <= self.reserved_to:
            return True
        held = reserve_space(self.fd, start, nbytes)
        self.reserved_to = start + nbytes if held else 0
        return held

    @property
    def swmr(self) -> bool:
        return bool(self.h5.swmr_mode)

    def start_swmr(self) -> None:
        """From now on: appending and changing values only, no new object (HDF5's SWMR
        rule). Like HDF5's own SWMR writer, the writer then lets go of HDF5's lock on the
        file, so that SWMR readers with HDF5's default locking (``h5py.File(path, "r",
        swmr=True)``, silx) open it; its lock file keeps other writers out, and the file's
        "open for writing" flags keep out every other HDF5 program that would open it
        without SWMR."""
        with self.lock:
            if not self.h5.swmr_mode:
                self.h5.swmr_mode = True
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            except OSError:  # a file system that cannot lock: nothing was held
                pass


class OpenFiles:
    """`acquire(path)` opens (or shares) a file for appending; `release()` closes it when its
    last user is done.

    Files are created with ``libver="latest"`` (what SWMR needs); SWMR writing starts once
    every object of the scan exists (:meth:`OpenFile.start_swmr`). While it writes a file
    the writer holds its lock file (:class:`WriterLock`: a second writer is refused with
    :class:`FileLockedError`); until SWMR writing starts it also holds the same lock on the
    file as HDF5 (flock), which keeps out programs that have it open. HDF5's own locking is
    off in the writer's opens (the writer takes the lock itself). ``acquire(path,
    resume=True)`` first clears the "open for writing" flags a writer killed -9 left in the
    file (:func:`clear_write_flags`)."""

    def __init__(self):
        self._files: dict[Path, OpenFile] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path, resume: bool = False, swmr: bool = True) -> OpenFile:
        """`swmr=False`: a file that will not be written in SWMR mode is made as before
        (HDF5's earliest format: no "open for writing" flags that would keep readers out)."""
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = self._open(path, resume, swmr)
            handle.users += 1
            return handle

    @staticmethod
    def _open(path: Path, resume: bool = False, swmr: bool = True) -> OpenFile:
        writer_lock = WriterLock(path)
        fd = -1
        try:
            fd = OpenFiles._open_and_lock(path, resume, swmr)
            # rdcc_nbytes=0: no chunk cache. Points go straight to their chunk in the file;
            # a cache would hold a whole chunk per dataset (1 MiB each: 1 GB for 1024 channels)
            libver = "latest" if swmr else None
            try:
                try:
                    h5 = h5py.File(path, "r+", libver=libver, locking=False, rdcc_nbytes=0)
                except OSError as exc:
                    # left "open for writing" by a writer killed -9: ours (resume), and no
                    # other writer has its lock file
                    if not (resume and _left_open(exc) and clear_write_flags(path)):
                        raise
                    log.warning("%s was left open for writing (a writer killed?): flags "
                                "cleared, resuming", path)
                    h5 = h5py.File(path, "r+", libver=libver, locking=False, rdcc_nbytes=0)
            except (OSError, ValueError) as exc:
                raise OSError(f"cannot open {path} as HDF5 for writing: {os_reason(exc)}") \
                    from None
        except BaseException:
            if fd >= 0:
                os.close(fd)
            writer_lock.release()
            raise
        return OpenFile(path, h5, writer_lock, fd)

    @staticmethod
    def _open_and_lock(path: Path, resume: bool, swmr: bool) -> int:
        """The data file (made if missing), open, with HDF5's exclusive lock taken: programs
        that have it open with HDF5's locking (readers too: HDF5 readers hold a shared lock)
        make this fail with FileLockedError. Except for a scan resumed after a writer was
        killed in SWMR mode: its flags let only SWMR readers in since, and those read safely
        while the writer goes on."""
        try:
            if not path.exists():
                h5py.File(path, "w-", libver="latest" if swmr else None, locking=False).close()
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise OSError(f"cannot create or open {path} for writing: {os_reason(exc)}") \
                from None
        if try_flock(fd, fcntl.LOCK_EX, path):
            return fd
        if resume and status_flags(path) == SWMR_WRITING_FLAGS:
            return fd
        os.close(fd)
        raise FileLockedError(f"cannot open {path} for writing: it is locked by another "
                              f"program that has it open")

    @staticmethod
    def _close(handle: OpenFile) -> None:
        with handle.lock:
            try:
                handle.h5.close()
            except Exception:  # closing a file on a full disk may fail: data was flushed
                pass
            finally:
                try:  # give back the room reserved beyond the end (truncate to the same size)
                    os.ftruncate(handle.fd, os.fstat(handle.fd).st_size)
                except OSError:
                    pass
                os.close(handle.fd)
                handle.writer_lock.release()

    def release(self, handle: OpenFile) -> None:
        with self._lock:
            handle.users -= 1
            if handle.users <= 0:
                self._files.pop(handle.path, None)
                self._close(handle)

    def close_all(self) -> None:
        with self._lock:
            for handle in self._files.values():
                self._close(handle)
