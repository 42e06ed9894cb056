"""The writer only writes under its configured data roots (anyone who can write to Redis must
not be able to make it overwrite arbitrary files). Paths are resolved (symlinks followed, ".."
folded) before they are compared with the roots."""

from __future__ import annotations

import os
from pathlib import Path


class PathRefused(ValueError):
    """A path outside the data roots; the message says which path, which roots and why."""


def _real_roots(data_roots) -> list[Path]:
    roots = []
    for root in data_roots:
        real = Path(root).resolve()
        if not real.is_dir():
            raise PathRefused(f"data root {root} does not exist or is not a folder")
        roots.append(real)
    return roots


def _inside(path: str, data_roots, what: str) -> Path:
    if not os.path.isabs(path):
        raise PathRefused(f"{what} {path!r} is a relative path; only absolute paths under the "
                          f"data roots {list(map(str, data_roots))} are written")
    real = Path(path).resolve()  # follows symlinks of the parts that exist, folds ".."
    roots = _real_roots(data_roots)
    if not any(real == root or real.is_relative_to(root) for root in roots):
        via = "" if str(real) == os.path.normpath(path) else f" (it resolves to {real})"
        raise PathRefused(f"{what} {path} is outside the data roots "
                          f"{list(map(str, data_roots))}{via}; refused")
    return real


def resolve_scan_file(path: str, data_roots) -> Path:
    """The real path of a scan's file, or PathRefused."""
    real = _inside(path, data_roots, "scan file")
    if real.exists() and not real.is_file():
        raise PathRefused(f"scan file {path} exists and is not a regular file")
    for folder in real.parents:  # the folders the writer would create (mkdir says "File exists")
        if folder.exists():
            if not folder.is_dir():
                raise PathRefused(f"scan file {path}: {folder} is a file, not a folder")
            break
    return real


def scan_file_path(path: str, number: int, file_layout: str, data_roots) -> Path:
    """The file a scan goes to: its path ("shared" layout) or "<stem>_<number>.h5" beside
    it ("per_scan"), resolved; PathRefused outside the data roots."""
    wanted = Path(path)
    if file_layout == "per_scan":
        wanted = wanted.with_name(f"{wanted.stem}_{number:04d}{wanted.suffix or '.h5'}")
    return resolve_scan_file(str(wanted), data_roots)


def check_link_target(target: str, scan_file: str, data_roots) -> Path:
    """External link files and virtual-dataset sources: relative ones start at the scan
    file's folder; the same rule as for scan files."""
    if not os.path.isabs(target):
        target = str(Path(scan_file).parent / target)
    return _inside(target, data_roots, "linked file")
