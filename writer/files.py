"""Open HDF5 files shared by the scans written into them (several scans, one file)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py


@dataclass
class OpenFile:
    path: Path
    h5: h5py.File
    lock: threading.RLock = field(default_factory=threading.RLock)
    users: int = 0


class OpenFiles:
    """`acquire(path)` opens (or shares) a file for appending; `release()` closes it when its
    last scan is done. HDF5's file lock stays on (another program writing the same file makes
    the open fail with a clear error); readers open with ``h5py.File(path, "r",
    locking=False)`` and see everything up to the last flush."""

    def __init__(self):
        self._files: dict[Path, OpenFile] = {}
        self._lock = threading.Lock()

    def acquire(self, path: Path) -> OpenFile:
        with self._lock:
            handle = self._files.get(path)
            if handle is None:
                try:
                    h5 = h5py.File(path, "a")
                except OSError as exc:
                    reason = str(exc)
                    if "lock" in reason.lower():
                        reason = f"it is locked by another program ({reason})"
                    raise OSError(f"cannot open {path} for writing: {reason}") from None
                handle = self._files[path] = OpenFile(path, h5)
            handle.users += 1
            return handle

    def release(self, handle: OpenFile) -> None:
        with self._lock:
            handle.users -= 1
            if handle.users <= 0:
                self._files.pop(handle.path, None)
                with handle.lock:
                    try:
                        handle.h5.close()
                    except Exception:  # closing a file on a full disk may fail: data is flushed
                        pass

    def close_all(self) -> None:
        with self._lock:
            for handle in self._files.values():
                with handle.lock:
                    handle.h5.close()
            self._files.clear()
