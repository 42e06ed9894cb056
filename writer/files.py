"""Open HDF5 files shared by the scans written into them (several scans, one file)."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py


def os_reason(exc: OSError) -> str:
    """An OSError in the system's few words (HDF5's own messages run over several lines)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full ({os.strerror(exc.errno)})"
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass
class OpenFile:
    path: Path
    h5: h5py.File
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0
    lock_fd: int = -1  # holds the exclusive file lock other HDF5 programs respect


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
            raise OSError(f"cannot open {path} for writing: it is locked by another "
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
