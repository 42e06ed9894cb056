"""The writer's HDF5 files: each scan's own file, written in SWMR mode (:class:`OpenFiles`),
the shared file of a session that links to them (:func:`link_entry`), and the repair of a
file left "open for writing" by a writer killed -9 (:func:`clear_write_flags`).

Why this layout: see docs/files.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import shutil
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py

log = logging.getLogger("blisswriter")


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


# ---- the superblock's consistency flags ---------------------------------------------------
_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's metadata
    (``H5_checksum_lookup3``)."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k:k + 4], "little")) & m
        b = (b + int.from_bytes(data[k + 4:k + 8], "little")) & m
        c = (c + int.from_bytes(data[k + 8:k + 12], "little")) & m
        a = (a - c) & m; a ^= _rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= _rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 4); b = (b + a) & m  # noqa: E702
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    c ^= b; c = (c - _rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & m  # noqa: E702
    return c


#: the superblock's status flags (HDF5's H5F_SUPER_WRITE_ACCESS | H5F_SUPER_SWMR_WRITE_ACCESS)
WRITE_FLAGS = 0x01
SWMR_WRITING_FLAGS = 0x05


def clear_write_flags(path) -> bool:
    """What ``h5clear -s`` does: mark a file as no longer open for writing. A writer killed
    while it had the file open (SWMR or not) leaves these flags set, and HDF5 then refuses
    to open the file except read-only with ``swmr=True``.

    The flags are byte 11 of a version 2 or 3 superblock (at offset 0, or 512, 1024, ... after
    a user block), covered by the superblock's lookup3 checksum. True if flags were cleared,
    False if there were none; ValueError if the file has no such superblock. Only for a file
    no program has open for writing (the writer checks its own lock first)."""
    return set_status_flags(path, 0) != 0


def set_status_flags(path, flags: int) -> int:
    """Write the superblock's status flags (0: closed; :data:`SWMR_WRITING_FLAGS`: "being
    written in SWMR mode") and return the ones it had. ValueError if the file has no version
    2 or 3 superblock or its checksum is wrong (nothing is written then)."""
    with open(path, "r+b") as fh:
        offset = _superblock_offset(fh)
        if offset is None:
            raise ValueError(f"{path}: no HDF5 superblock found")
        fh.seek(offset)
        head = fh.read(48)
        version, size_offsets = head[8], head[9]
        if version not in (2, 3):
            raise ValueError(f"{path}: superblock version {version} has no consistency "
                             "flags (only versions 2 and 3, libver 'latest')")
        end = 12 + 4 * size_offsets  # flags, then 4 addresses, then the checksum
        fh.seek(offset)
        block = bytearray(fh.read(end + 4))
        if lookup3(bytes(block[:end])) != int.from_bytes(block[end:end + 4], "little"):
            raise ValueError(f"{path}: the superblock's checksum is wrong; not touched")
        before = block[11]
        if before == flags:
            return before
        block[11] = flags
        block[end:end + 4] = lookup3(bytes(block[:end])).to_bytes(4, "little")
        fh.seek(offset)
        fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    return before


def status_flags(path) -> int | None:
    """The superblock's status flags of the file at `path`: non-zero while a program has it
    open for writing (or one killed while it had), 0 once closed; None for a file without
    such flags (superblock version 0 or 1, not HDF5, missing)."""
    try:
        with open(path, "rb") as fh:
            offset = _superblock_offset(fh)
            if offset is None:
                return None
            fh.seek(offset + 8)
            head = fh.read(4)
    except OSError:
        return None
    return head[3] if len(head) == 4 and head[0] in (2, 3) else None


def swmr_capable(path) -> bool:
    """Whether the file at `path` can be written in SWMR mode: it does not exist yet (the
    writer makes it so), or it has a version 3 superblock (``libver="latest"``). A file an
    older version made without SWMR (version 0) is written on as it was."""
    try:
        with open(path, "rb") as fh:
            offset = _superblock_offset(fh)
            if offset is None:
                return False
            fh.seek(offset + 8)
            return fh.read(1)[0] >= 3  # the superblock's version
    except FileNotFoundError:
        return True


def _superblock_offset(fh) -> int | None:
    """Where the HDF5 superblock of the open file `fh` starts (0, or 512, 1024, ... after a
    user block), or None if it has none."""
    offset = 0
    while True:
        fh.seek(offset)
        head = fh.read(9)
        if len(head) < 9:
            return None
        if head[:8] == _SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2


def _left_open(exc: OSError) -> bool:
    return "already open for write" in str(exc)


# ---- keeping a second writer out -------------------------------------------------------------
#: errors of flock where the file system cannot lock (NFS mounted with ``nolock``, some FUSE)
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_locking_warned: set[str] = set()


def _flock(fd: int, how: int, path: Path) -> bool:
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
            if not _flock(fd, fcntl.LOCK_EX, self.path):
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
        if _flock(fd, fcntl.LOCK_EX, path):
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
            self._files.clear()


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
