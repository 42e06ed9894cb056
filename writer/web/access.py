"""What `blisswriter serve` may read: files under its data roots, opened read-only without
ever locking against the writer.

Every path a request names goes through `DataRoots.resolve` (no `..`, nothing outside the
roots, symlinks leading out refused); every HDF5 object is reached through `follow_links`
(external links are followed by the server, not h5py, and like virtual-dataset sources
must point inside the roots); every file is opened by `open_h5`, the one place that
decides how.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  the compression filters (Bitshuffle/LZ4, zstd, blosc2)

#: what the file browser lists
HDF5_SUFFIXES = (".h5", ".hdf5", ".nxs", ".nx", ".hdf")
MAX_LINK_HOPS = 32  # links that lead to links: more is a loop


class AccessError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file for reading, whoever is writing it.

    A finished file opens plainly; a scan being written (SWMR, or left marked open by a
    killed writer) only with ``swmr=True``. ``locking=False``: the server never takes a lock
    the writer could trip on (HDF5's readers hold a shared lock while a file is open, and a
    writer resuming a scan it stopped cleanly takes HDF5's exclusive lock). Files of older
    writers are not SWMR-capable, so the plain open comes first. Each call opens the file
    anew, so the lengths read are the ones flushed by then."""
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError:
        return h5py.File(path, "r", swmr=True, locking=False)


class DataRoots:
    """The folders the server serves, resolved once (symlinks in the roots themselves are
    the administrator's choice and kept)."""

    def __init__(self, roots):
        if not roots:
            raise ValueError("at least one data root is needed (--data-root DIR)")
        self.roots, self.given = [], []  # resolved; as given (absolute)
        for root in roots:
            path = Path(root).expanduser()
            if not path.is_dir():
                raise ValueError(f"data root {root} is not an existing folder")
            self.roots.append(path.resolve())
            self.given.append(Path(os.path.abspath(path)))

    def root_of(self, path: Path) -> Path | None:
        """The root holding `path` (already resolved), or None."""
        for root in self.roots:
            if path == root or path.is_relative_to(root):
                return root
        return None

    def resolve(self, requested: str, *, want_dir: bool = False) -> Path:
        """The real path of a file (or folder) a request names: absolute, under a root.
        Raises AccessError 400/403/404 with the reason."""
        if not requested:
            raise AccessError(400, "no file given: add ?file=/path/to/file.h5")
        if "\0" in requested:
            raise AccessError(400, "file path contains a NUL byte")
        if ".." in Path(requested).parts:
            raise AccessError(403, f"{requested}: '..' is not allowed in file paths")
        if not os.path.isabs(requested):
            raise AccessError(400, f"{requested}: give an absolute path under a data root "
                                   f"({', '.join(map(str, self.roots))})")
        real = Path(os.path.realpath(requested))
        if self.root_of(real) is None:
            given = Path(os.path.normpath(requested))
            if any(given == r or given.is_relative_to(r) for r in self.given + self.roots):
                raise AccessError(403, f"{requested} leads outside the data roots (symlink)")
            raise AccessError(403, f"{requested} is outside the data roots")
        if want_dir:
            if not real.is_dir():
                raise AccessError(404, f"{requested}: no such folder")
        elif not real.is_file():
            raise AccessError(404, f"{requested}: no such file" if not real.exists()
                              else f"{requested} is not a file")
        return real

    def check_target(self, name: str, linking_file: str, what: str) -> Path | None:
        """An external file named by a link or a virtual-dataset source of `linking_file`:
        it must exist under the roots. HDF5 looks first beside the linking file for a
        relative name, first at the name itself for an absolute one: the file checked here
        is the one it opens."""
        if name == ".":  # a virtual dataset's source in its own file
            return None
        base = Path(linking_file).parent
        target = Path(name) if os.path.isabs(name) else base / name
        real = Path(os.path.realpath(target))
        if self.root_of(real) is None:
            raise AccessError(403, f"{what} points outside the data roots ({name})")
        if not real.is_file():
            raise AccessError(404, f"{what} points to a missing file ({name})")
        return real


def follow_links(roots: DataRoots, h5file: h5py.File, path: str,
                 opened: contextlib.ExitStack, hops: int = 0) -> tuple[h5py.File, str]:
    """Where `path` of `h5file` really is: (file, path in it). Soft links are walked (to see
    where they lead) but left to h5py; an external link is followed here, never by h5py:
    its file must be under the roots (else AccessError 403/404) and is opened with
    `open_h5` (a scan being written, behind the shared file's link, opens too), kept open
    by `opened` for the request."""
    parts = [p for p in path.split("/") if p]
    current = "/"
    while parts:
        name = parts.pop(0)
        child = current.rstrip("/") + "/" + name
        try:
            link = h5file.get(child, getlink=True)
        except (KeyError, OSError, RuntimeError):  # a dangling link higher up
            link = None
        if link is None:
            raise AccessError(404, f"{path} is not a valid path in {Path(h5file.filename).name}")
        if isinstance(link, h5py.SoftLink):
            if hops >= MAX_LINK_HOPS:
                raise AccessError(404, f"{path}: more than {MAX_LINK_HOPS} links (a loop?)")
            target = link.path if link.path.startswith("/") else (
                current.rstrip("/") + "/" + link.path)
            full = "/" + "/".join([p for p in target.split("/") if p] + parts)
            where = follow_links(roots, h5file, full, opened, hops + 1)
            # through an external link: where it leads; in this file: h5py follows it
            return where if where[0] is not h5file else (h5file, path)
        if isinstance(link, h5py.ExternalLink):
            if hops >= MAX_LINK_HOPS:
                raise AccessError(404, f"{path}: more than {MAX_LINK_HOPS} links (a loop?)")
            where = f"external link {child} of {Path(h5file.filename).name}"
            linked = roots.check_target(link.filename, h5file.filename, where)
            try:
                other = opened.enter_context(open_h5(linked))
            except OSError as exc:
                raise AccessError(404, f"{where}: {linked} does not open: {exc}") from None
            rest = "/".join([p for p in link.path.split("/") if p] + parts)
            return follow_links(roots, other, "/" + rest, opened, hops + 1)
        current = child
    return h5file, path


def check_virtual_sources(roots: DataRoots, dataset: h5py.Dataset) -> None:
    """A virtual dataset is read only when every source file is inside the roots."""
    if not dataset.is_virtual:
        return
    for source in dataset.virtual_sources():
        roots.check_target(source.file_name, dataset.file.filename,
                           f"virtual dataset {dataset.name}")
