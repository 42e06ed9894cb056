"""Keeping a second writer out of a data file: the flock a writer holds on a lock file
beside it for as long as it writes it (:class:`WriterLock`), never on the HDF5 file itself,
so that HDF5's SWMR readers are not kept out."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from pathlib import Path


from .os_errors import os_reason

log = logging.getLogger("blisswriter")


class FileLockedError(OSError):
    """Another process has the file open for writing (its exclusive lock is taken)."""



#: errors of flock where the file system cannot lock (NFS mounted with ``nolock``, some FUSE)
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_locking_warned: set[str] = set()


def try_flock(fd: int, how: int, path: Path) -> bool:
    """flock(fd, how | LOCK_NB): True if taken, False if another holds it. Where the file
    system cannot lock at all, True after a warning (once per folder): the writer pool's
    leases and HDF5's "open for writing" flags still keep other writers out."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_LOCKING:
            raise
        folder = str(path.parent)
        if folder not in _locking_warned:
            _locking_warned.add(folder)
            log.warning("%s: the file system cannot lock files (%s); writing without a "
                        "file lock there", folder, os_reason(exc))
        return True


def lock_file_of(path: Path) -> Path:
    """The writer's lock file for data file `path`: `.<name>.lock` beside it."""
    return path.with_name(f".{path.name}.lock")


class WriterLock:
    """The exclusive lock a writer holds on a data file for as long as it writes it: a flock
    on a lock file beside it (:func:`lock_file_of`), never on the HDF5 file itself, so that
    HDF5's SWMR readers (silx, h5py with its default locking) are not kept out. Removed
    when released. :class:`FileLockedError` when another writer holds it, in this process
    or another (a process holds at most one lock per file: on NFS, where flock is emulated
    with POSIX locks, a second one would be granted to the same process and closing it
    would drop the first)."""

    _held: set[Path] = set()
    _held_guard = threading.Lock()

    def __init__(self, path: Path):
        self.path = lock_file_of(path)
        self._fd = -1
        with self._held_guard:
            if self.path in self._held:
                raise FileLockedError(f"cannot open {path} for writing: this process is "
                                      "already writing it")
            self._held.add(self.path)
        try:
            self._take(path)
        except BaseException:
            with self._held_guard:
                self._held.discard(self.path)
            raise

    def _take(self, data_path: Path) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not try_flock(fd, fcntl.LOCK_EX, self.path):
                os.close(fd)
                raise FileLockedError(f"cannot open {data_path} for writing: another writer "
                                      f"has it open (its lock file {self.path} is locked)")
            try:  # the previous holder may have removed the file as we opened it: again
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)  # while locked: the next writer then makes a new one
        except OSError:
            pass
        os.close(self._fd)
        self._fd = -1
        with self._held_guard:
            self._held.discard(self.path)
