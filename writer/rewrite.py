"""`blisswriter rewrite IN.h5 OUT.h5 --compression NAME`: the same entries with other storage
settings (e.g. an old gzip file recompressed with Bitshuffle+LZ4); data identical.

Groups, attributes, soft and external links, hard links (one dataset, several names) and
virtual datasets are kept; every chunked dataset is written again with the new compression
(same chunk shape), chunk by chunk through DatasetAppender (bslz4: compressed in parallel);
small contiguous/compact datasets are copied as they are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (filters for reading)
import numpy as np

from .compression import parse_compression
from .dataset_writer import DatasetAppender


class RewriteError(ValueError):
    pass


def rewrite(src_path: str, dst_path: str, compression=None, chunk_points: int = 256) -> dict:
    """Rewrite every object of `src_path` into the new file `dst_path`; counts of what
    was done. RewriteError for bad arguments; the output is removed if anything fails."""
    setting = parse_compression(compression)
    src_p, dst_p = Path(src_path), Path(dst_path)
    if not src_p.exists():
        raise RewriteError(f"{src_path}: no such file")
    if not h5py.is_hdf5(src_p):
        raise RewriteError(f"{src_path}: not an HDF5 file")
    if dst_p.exists():
        raise RewriteError(f"{dst_path} exists; the rewrite never overwrites a file")
    counts = {"datasets rewritten": 0, "datasets copied": 0, "links": 0, "groups": 0}
    try:
        with h5py.File(src_p, "r", locking=False) as src, h5py.File(dst_p, "w-") as dst:
            dst.attrs.update(dict(src.attrs))
            if "file_name" in dst.attrs:
                dst.attrs["file_name"] = str(dst_p)
            _copy_group(src, dst, setting, counts, {}, chunk_points)
    except Exception:
        dst_p.unlink(missing_ok=True)
        raise
    return counts


def _copy_group(src, dst, setting, counts, copied: dict, chunk_points: int) -> None:
    for name in src:
        link = src.get(name, getlink=True)
        if isinstance(link, (h5py.SoftLink, h5py.ExternalLink)):
            dst[name] = link
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
            _copy_group(obj, group, setting, counts, copied, chunk_points)
        elif obj.is_virtual:
            layout = h5py.VirtualLayout(shape=obj.shape, dtype=obj.dtype)
            for vs in obj.virtual_sources():
                source = h5py.VirtualSource(vs.file_name, vs.dset_name,
                                            shape=vs.src_space.shape)
                layout[_selection(vs.vspace)] = source[_selection(vs.src_space)]
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


def _selection(space):
    lo, hi = space.get_select_bounds()
    return tuple(slice(a, b + 1) for a, b in zip(lo, hi))


def _rewrite_dataset(src, dst, name, setting, chunk_points) -> None:
    point_shape = tuple(-1 if m is None else d for d, m in zip(src.shape[1:], src.maxshape[1:]))
    appender = DatasetAppender(dst, name, src.dtype, point_shape, compression=setting,
                               fill_value=src.fillvalue, attrs=dict(src.attrs))
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

    parser = argparse.ArgumentParser(prog="blisswriter rewrite", description=__doc__)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--compression", default="bitshuffle-lz4",
                        help="bitshuffle-lz4 (default), zstd, blosc2, gzip, none")
    parser.add_argument("--level", type=int, help="zstd / gzip / blosc2 level")
    args = parser.parse_args(argv)
    try:
        setting = parse_compression({"name": args.compression, **(
            {"level": args.level} if args.level is not None else {})})
        counts = rewrite(args.input, args.output, setting)
    except (RewriteError, ValueError) as exc:
        print(f"blisswriter rewrite: {exc}", file=sys.stderr)
        return 2
    size_in, size_out = os.path.getsize(args.input), os.path.getsize(args.output)
    print(f"{args.input} ({size_in / 1e6:.1f} MB) -> {args.output} ({size_out / 1e6:.1f} MB, "
          f"{setting.name}): " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0
