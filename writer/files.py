"""Open HDF5 files shared by the scans written into them (several scans, one file)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py


def os_reason(exc: BaseException) -> str:
    """A file error in the system's few words (HDF5's own messages run over several lines).

    h5py raises OSError for most file errors but RuntimeError for some (a failed flush), with
    the errno only inside the message ("errno = 28"); both are understood."""
    code = getattr(exc, "errno", None)
    if not code:
        found = re.search(r"errno = (\d+)", str(exc))
        code = int(found.group(1)) if found else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full ({os.strerror(code)})"
    if code:
        return os.strerror(code)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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


def is_file_error(exc: BaseException) -> bool:
    """An error from the file system: an OSError, or h5py's RuntimeError carrying an errno."""
    return isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "errno = " in str(exc))


class FileLockedError(OSError):
    """Another process has the file open for writing (its exclusive lock is taken)."""


@dataclass
class OpenFile:
    path: Path
    h5: h5py.File
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0
    lock_fd: int = -1  # holds the exclusive file lock other HDF5 programs respect

    def reserve(self, nbytes: int) -> bool:
        """Hold ``nbytes`` of disk beyond the file's end for the writes to come (see
        :func:`reserve_space`); the room not used is given back when the file is closed."""
        return reserve_space(self.lock_fd, self.h5.id.get_filesize(), nbytes)


class OpenFiles:
    """`acquire(path)` opens (or shares) a file for appending; `release()` closes it when its
    last scan is done.

    The writer takes the same exclusive lock as HDF5 (flock) itself and opens the file with
    HDF5's own locking off: another program that has the file open for writing makes the open
    fail with a clear error, programs opening it with HDF5's default locking are kept out,
    and readers that open it with ``h5py.File(path, "r", locking=False)`` (in any process,
    this one included) see everything up to the last flush."""

    def __init__(self):
        self._files: dict[Path, OpenFile] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path) -> OpenFile:
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = self._open(path)
            handle.users += 1
            return handle

    @staticmethod
    def _open(path: Path) -> OpenFile:
        try:
            if not path.exists():
                h5py.File(path, "w-", locking=False).close()
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise OSError(f"cannot create or open {path} for writing: {os_reason(exc)}") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FileLockedError(f"cannot open {path} for writing: it is locked by another "
                          f"program that has it open") from None
        try:
            h5 = h5py.File(path, "r+", locking=False)
        except OSError as exc:
            os.close(fd)
            raise OSError(f"cannot open {path} as HDF5 for writing: {os_reason(exc)}") \
                from None
        return OpenFile(path, h5, lock_fd=fd)

    @staticmethod
    def _close(handle: OpenFile) -> None:
        with handle.lock:
            try:
                handle.h5.close()
            except Exception:  # closing a file on a full disk may fail: data was flushed
                pass
            finally:
                try:  # give back the room reserved beyond the end (truncate to the same size)
                    os.ftruncate(handle.lock_fd, os.fstat(handle.lock_fd).st_size)
                except OSError:
                    pass
                os.close(handle.lock_fd)  # releases the lock

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
            self._files.clear()
