"""`blisswriter rewrite IN.h5 OUT.h5 --compression NAME`: the same entries with other storage
settings (e.g. an old gzip file recompressed with Bitshuffle+LZ4); data identical.

Groups, attributes, soft and external links, hard links (one dataset, several names) and
virtual datasets are kept; every chunked dataset of numbers is written again with the new
compression, block by block through DatasetAppender (bslz4: compressed in parallel), its
chunk shape chosen anew as the writer chooses it for a scan of that many points
(writer/hdf5/chunking.py: from dtype, point shape and length), not copied from INPUT; other
datasets are copied as they are.

It only reads INPUT. A file with a scan still being written is refused (exit 3): rewrite it
once done. Exit 2 for a bad argument or a file that cannot be read.

Files a virtual dataset or an external link points to (a detector's own files) stay where
they are. HDF5 looks for a relative source next to the file that names it, so when OUT is in
another folder each relative name is rewritten relative to OUT (or made absolute with
--absolute-sources); the output reads the same values wherever it goes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (filters for reading)
import numpy as np


from ..hdf5.being_written import EXIT_BEING_WRITTEN, scans_being_written
from ..hdf5.compression import ACCEPTED_NAMES, parse_compression
from ..hdf5.dataset_writer import DatasetAppender
from ..hdf5.references import OWN_FILE_ATTR


class RewriteError(ValueError):
    pass


class InputBeingWritten(RewriteError):
    """INPUT has a scan still being written."""


def rewrite(src_path: str, dst_path: str, compression=None, chunk_points: int = 256,
            absolute_sources: bool = False) -> dict:
    """Rewrite every object of `src_path` into the new file `dst_path`; counts of what
    was done. RewriteError for bad arguments; the output is removed if anything fails.

    Relative file names of virtual-dataset sources and external links are rewritten to
    point, from `dst_path`'s folder, at the same files (absolute if `absolute_sources`);
    counts["missing sources"] lists those the input already could not find."""
    setting = parse_compression(compression)
    src_p, dst_p = Path(src_path), Path(dst_path)
    if not src_p.exists():
        raise RewriteError(f"{src_path}: no such file")
    if not h5py.is_hdf5(src_p):
        raise RewriteError(f"{src_path}: not an HDF5 file")
    busy = scans_being_written(src_p)
    if busy:
        raise InputBeingWritten("\n".join(scan.message(src_path, "rewrite") for scan in busy))
    if dst_p.exists():
        raise RewriteError(f"{dst_path} exists; the rewrite never overwrites a file")
    if not dst_p.parent.is_dir():
        what = "is not a folder" if dst_p.parent.exists() else "does not exist"
        raise RewriteError(f"{dst_path}: {dst_p.parent} {what}")
    counts = {"datasets rewritten": 0, "datasets copied": 0, "links": 0, "groups": 0}
    sources = _SourceMover(src_p, dst_p, absolute_sources)
    try:
        with h5py.File(src_p, "r", locking=False) as src, h5py.File(dst_p, "w-") as dst:
            dst.attrs.update(dict(src.attrs))
            if "file_name" in dst.attrs:
                dst.attrs["file_name"] = str(dst_p)
            _copy_group(src, dst, setting, counts, {}, chunk_points, sources)
    except Exception:
        dst_p.unlink(missing_ok=True)
        raise
    counts["source names rewritten"] = sources.moved
    if sources.missing:
        counts["missing sources"] = sorted(sources.missing)
    return counts


class _SourceMover:
    """New names for the files that virtual datasets and external links of IN point to, so
    that they name the same files from OUT's folder."""

    def __init__(self, src_file: Path, dst_file: Path, absolute: bool):
        self.src_dir = src_file.resolve().parent
        self.dst_dir = dst_file.resolve().parent
        self.absolute = absolute
        self.moved = 0  # names changed
        self.missing: set[str] = set()  # files the input itself does not find

    def __call__(self, name: str) -> str:
        if name == "." or os.path.isabs(name):  # "." is the file itself
            if name != "." and not os.path.exists(name):
                self.missing.add(name)
            return name
        target = os.path.normpath(self.src_dir / name)
        if not os.path.exists(target):
            self.missing.add(target)
        new = target if self.absolute else os.path.relpath(target, self.dst_dir)
        if new != name:
            self.moved += 1
        return new


def _copy_group(src, dst, setting, counts, copied: dict, chunk_points: int, sources) -> None:
    for name in src:
        link = src.get(name, getlink=True)
        # a shared file's entries are external links to each scan's own file
        # (docs/files.md): the entry itself is rewritten into the output
        entry_link = (isinstance(link, h5py.ExternalLink) and src.name == "/"
                      and link.path == f"/{name}")
        if isinstance(link, h5py.SoftLink):
            dst[name] = link
            counts["links"] += 1
            continue
        if isinstance(link, h5py.ExternalLink) and not entry_link \
                and not _references_own_file(src, name):
            dst[name] = h5py.ExternalLink(sources(link.filename), link.path)
            counts["links"] += 1
            continue
        obj = src[name]
        if obj.id in copied:  # a hard link to something already rewritten
            dst[name] = dst[copied[obj.id]]
            counts["links"] += 1
            continue
        if isinstance(obj, h5py.Group):
            group = dst.create_group(name)
            group.attrs.update(dict(obj.attrs))
            counts["groups"] += 1
            # inside a scan's own file, relative names start at that file's folder
            outer, sources.src_dir = sources.src_dir, Path(obj.file.filename).resolve().parent
            try:
                _copy_group(obj, group, setting, counts, copied, chunk_points, sources)
            finally:
                sources.src_dir = outer
        elif obj.is_virtual:
            layout = h5py.VirtualLayout(shape=obj.shape, dtype=obj.dtype)
            # relative source names start at the folder of the file holding the dataset
            outer, sources.src_dir = sources.src_dir, Path(obj.file.filename).resolve().parent
            try:
                for vs in obj.virtual_sources():
                    source = h5py.VirtualSource(sources(vs.file_name), vs.dset_name,
                                                shape=vs.src_space.shape)
                    layout[_selection(vs.vspace)] = source[_selection(vs.src_space)]
            finally:
                sources.src_dir = outer
            out = dst.create_virtual_dataset(name, layout, fillvalue=obj.fillvalue)
            out.attrs.update(dict(obj.attrs))
            counts["datasets copied"] += 1
        elif obj.chunks is not None and obj.ndim >= 1 and obj.dtype.kind in "biufc":
            _rewrite_dataset(obj, dst, name, setting, chunk_points)
            counts["datasets rewritten"] += 1
        else:
            dst.copy(obj, name)
            counts["datasets copied"] += 1
        copied[obj.id] = dst[name].name


def _references_own_file(group, name: str) -> bool:
    """Whether `group[name]` is the link to the virtual dataset of a `references` stream in
    a file of its own (writer/hdf5/references.py): rewritten as a virtual dataset in the output."""
    try:
        target = group.get(name)
    except (OSError, KeyError):
        return False
    return isinstance(target, h5py.Dataset) and OWN_FILE_ATTR in target.file.attrs


def _selection(space):
    lo, hi = space.get_select_bounds()
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi))


def _rewrite_dataset(src, dst, name, setting, chunk_points) -> None:
    point_shape = tuple(-1 if m is None else d for d, m in zip(src.shape[1:], src.maxshape[1:]))
    appender = DatasetAppender(dst, name, src.dtype, point_shape, compression=setting,
                               fill_value=src.fillvalue, attrs=dict(src.attrs),
                               npoints=src.shape[0] or None)  # chunks fit its length
    step = max(1, min(chunk_points, (8 * 2**20) // max(1, src.dtype.itemsize *
                                                       int(np.prod(src.shape[1:])))))
    for start in range(0, src.shape[0], step):
        block = src[start:start + step]
        if -1 in point_shape:
            appender.append_varying(list(block))
        else:
            appender.append(block)
    appender.close()


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="blisswriter rewrite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--compression", default="bitshuffle-lz4",
                        help=f"one of {', '.join(ACCEPTED_NAMES)} (default bitshuffle-lz4; bslz4 "
                             f"and bitshuffle_lz4 are other names for it)")
    parser.add_argument("--level", type=int, help="zstd / gzip / blosc2 level")
    parser.add_argument("--absolute-sources", action="store_true",
                        help="name the files of virtual datasets and external links by "
                             "absolute path (default: relative to OUTPUT's folder, as in "
                             "INPUT)")
    args = parser.parse_args(argv)
    try:
        setting = parse_compression({"name": args.compression, **(
            {"level": args.level} if args.level is not None else {})})
        counts = rewrite(args.input, args.output, setting,
                         absolute_sources=args.absolute_sources)
    except InputBeingWritten as exc:
        print(f"blisswriter rewrite: {exc}", file=sys.stderr)
        return EXIT_BEING_WRITTEN
    except (RewriteError, ValueError) as exc:
        print(f"blisswriter rewrite: {exc}", file=sys.stderr)
        return 2
    except (OSError, KeyError, RuntimeError) as exc:  # h5py on a file it cannot read
        print(f"blisswriter rewrite: {args.input} could not be rewritten: {exc}",
              file=sys.stderr)
        return 2
    missing = counts.pop("missing sources", [])
    size_in, size_out = os.path.getsize(args.input), os.path.getsize(args.output)
    print(f"{args.input} ({size_in / 1e6:.1f} MB) -> {args.output} ({size_out / 1e6:.1f} MB, "
          f"{setting.name}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for path in missing:
        print(f"blisswriter rewrite: warning: {path} (named by a virtual dataset or external "
              f"link of {args.input}) does not exist; kept as named", file=sys.stderr)
    return 0
