"""What the page lists besides a file's content: the scans the writer knows of (what
`blisswriter status` shows) and the folders and HDF5 files under the data roots."""

from __future__ import annotations

from pathlib import Path

import redis

from ..state import status as writer_status
from ..state.status import done_points, select
from .access import HDF5_SUFFIXES, AccessError, DataRoots

MAX_LISTED = 2000  # entries of one folder: a folder of 100k files is not a page


def recent_scans(client, roots: DataRoots, last: int = 50) -> list[dict]:
    """Scans not finished and the `last` finished most recently, newest first, each with
    where its file and entry are (``file`` empty when the writer has none or the file is
    outside the roots: the page then shows the scan without a link)."""
    statuses, _ = select(writer_status.read_recent(client), last=last)
    rows = []
    for st in sorted(statuses, key=lambda st: st.started or st.updated, reverse=True):
        servable = bool(st.file) and roots.root_of(Path(st.file).resolve()) is not None
        rows.append({
            "scan_key": st.scan_key, "session": st.session, "number": st.number,
            "name": st.name, "state": st.state, "points": done_points(st),
            "expected_points": st.expected_points, "file": st.file if servable else "",
            "entry": st.entry, "error": st.error, "updated": st.updated,
            "live": not st.finished,
        })
    return rows


def read_scans(client, roots: DataRoots, last: int = 50) -> dict:
    """{"scans": [...]} or, Redis unreachable, {"scans": [], "error": why}: the file
    browser still works without Redis."""
    if client is None:
        return {"scans": [], "error": "no Redis configured (--redis URL): scans not listed"}
    try:
        return {"scans": recent_scans(client, roots, last)}
    except (redis.RedisError, OSError) as exc:
        return {"scans": [], "error": f"Redis unreachable: {exc}"}


def list_folder(roots: DataRoots, folder: str | None) -> dict:
    """The sub-folders and HDF5 files of `folder` (None: the roots themselves)."""
    if not folder:
        return {"folder": "", "parent": "",
                "folders": [str(r) for r in roots.roots], "files": []}
    real = roots.resolve(folder, want_dir=True)
    folders, files = [], []
    try:
        entries = sorted(real.iterdir(), key=lambda p: p.name)
    except PermissionError:
        raise AccessError(403, f"{folder}: permission denied") from None
    for entry in entries[:MAX_LISTED]:
        if entry.name.startswith(".") or roots.root_of(entry.resolve()) is None:
            continue  # hidden, or a symlink leading out of the roots
        if entry.is_dir():
            folders.append(str(entry))
        elif entry.suffix.lower() in HDF5_SUFFIXES and entry.is_file():
            stat = entry.stat()
            files.append({"path": str(entry), "size": stat.st_size, "mtime": stat.st_mtime})
    parent = "" if real in roots.roots else str(real.parent)
    return {"folder": str(real), "parent": parent, "folders": folders, "files": files,
            "truncated": len(entries) > MAX_LISTED}
