"""Storage layer benchmark: DatasetAppender vs bare h5py.

    python bench/bench_storage.py [--frames 1000] [--scalar-points 1000000]
                                  [--json bench/results/storage.json]

Frames are 512x512 uint16, Poisson counts on a smooth pattern (a peak and fringes on a low
background, compression ratio ~3.9 like the detector data in shared/DESIGN.md), 32 distinct
frames cycled, appended in batches of 10. Cases:

a. bare h5py, ``hdf5plugin.Bitshuffle(cname="lz4")``, one frame per chunk (HDF5's filter on
   one thread): the baseline;
b. DatasetAppender, same setting (bslz4 compression + write_direct_chunk), default workers;
   b-pool2 with a pool of 2 threads, b-pool0 with workers=0 (caller's thread, OpenMP);
c. bare h5py ``write_direct_chunk`` of frames already compressed (bslz4);
d. DatasetAppender.append_compressed of the same precompressed frames;
e. scalars: 64 float64 channels x N points, appended in batches of 100 per channel, with
   DatasetAppender and with bare h5py (resize + slice write, same chunks and filter).

MB/s count uncompressed bytes. Files go to a temporary directory on the repository's disk
(bench/), removed at the end. Times include closing the file; frame cases are the best of
--repeats runs (default 3).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from blissdata import bslz4  # noqa: E402
from writer.hdf5.chunking import chunk_shape  # noqa: E402
from writer.hdf5.dataset_writer import DatasetAppender  # noqa: E402

SHAPE = (512, 512)
BATCH = 10
NCHANNELS = 64
SCALAR_BATCH = 100


def make_frames(n_distinct=32, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    frames = np.empty((n_distinct, *SHAPE), np.uint16)
    for i in range(n_distinct):
        cx, cy = 300 + 3 * i, 200 - 2 * i  # the peak drifts a little from frame to frame
        base = (0.5 + 50 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 40 ** 2))
                + 15 * np.exp(-((x - 256) ** 2) / (2 * 150 ** 2)) * np.sin(y / 9.0) ** 2)
        frames[i] = rng.poisson(base)
    return frames


_BATCHES = {}


def batches(distinct: np.ndarray, nframes: int):
    """Batches of BATCH frames cycling `distinct`; made once (outside the timings) and reused,
    so they are writable arrays the caller owns (the appender may not keep references)."""
    k = len(distinct)
    for start in range(0, nframes, BATCH):
        stop = min(start + BATCH, nframes)
        key = (id(distinct), start % k, stop - start)
        if key not in _BATCHES:
            _BATCHES[key] = distinct[[i % k for i in range(start, stop)]]
        yield _BATCHES[key]


def timed(func):
    t0 = time.perf_counter()
    extra = func()
    return time.perf_counter() - t0, extra


def file_size(path) -> int:
    return os.path.getsize(path)


# ------------------------------------------------------------------------------ frames
def bare_h5py_filter(path, distinct, nframes):
    with h5py.File(path, "w") as f:
        d = f.create_dataset("d", shape=(0, *SHAPE), maxshape=(None, *SHAPE), dtype=np.uint16,
                             chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4"))
        n = 0
        for b in batches(distinct, nframes):
            d.resize(n + len(b), axis=0)
            d[n:n + len(b)] = b
            n += len(b)


def appender_frames(path, distinct, nframes, workers=None):
    with h5py.File(path, "w") as f:
        with DatasetAppender(f, "d", np.uint16, SHAPE, workers=workers) as app:
            for b in batches(distinct, nframes):
                app.append(b)


def bare_direct_chunks(path, chunks, nframes):
    with h5py.File(path, "w") as f:
        d = f.create_dataset("d", shape=(0, *SHAPE), maxshape=(None, *SHAPE), dtype=np.uint16,
                             chunks=(1, *SHAPE), **hdf5plugin.Bitshuffle(cname="lz4"))
        write = d.id.write_direct_chunk
        k = len(chunks)
        for start in range(0, nframes, BATCH):
            stop = min(start + BATCH, nframes)
            d.resize(stop, axis=0)
            for i in range(start, stop):
                write((i, 0, 0), chunks[i % k])


def appender_compressed(path, chunks, nframes):
    k = len(chunks)
    with h5py.File(path, "w") as f:
        with DatasetAppender(f, "d", np.uint16, SHAPE) as app:
            for start in range(0, nframes, BATCH):
                app.append_compressed([chunks[i % k]
                                       for i in range(start, min(start + BATCH, nframes))])


# ------------------------------------------------------------------------------ scalars
def scalar_batches(npoints, seed=1):
    rng = np.random.default_rng(seed)
    # a counter-like signal: smooth + noise; 64 channels share the pattern shifted
    t = np.arange(npoints)
    base = 1000 + 100 * np.sin(t / 5000.0)
    values = base + rng.normal(0, 3, npoints).round(1)
    return values


def appender_scalars(path, values, npoints):
    with h5py.File(path, "w") as f:
        apps = [DatasetAppender(f, f"c{i:02d}", np.float64, ()) for i in range(NCHANNELS)]
        for start in range(0, npoints, SCALAR_BATCH):
            for ch, app in enumerate(apps):
                app.append(values[start:start + SCALAR_BATCH] + ch)
        for app in apps:
            app.close()


def bare_h5py_scalars(path, values, npoints):
    chunks = chunk_shape(np.float64, ())
    with h5py.File(path, "w") as f:
        dsets = [f.create_dataset(f"c{i:02d}", shape=(0,), maxshape=(None,), dtype=np.float64,
                                  chunks=chunks, **hdf5plugin.Bitshuffle(cname="lz4"))
                 for i in range(NCHANNELS)]
        for start in range(0, npoints, SCALAR_BATCH):
            stop = min(start + SCALAR_BATCH, npoints)
            for ch, d in enumerate(dsets):
                d.resize(stop, axis=0)
                d[start:stop] = values[start:stop] + ch


# ------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--scalar-points", type=int, default=1_000_000,
                        help="points per channel for the scalar case (64 channels)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="frame cases: best time of this many runs (a shared machine)")
    parser.add_argument("--json", default="bench/results/storage.json",
                        help="write the results to this JSON file")
    parser.add_argument("--tmpdir", default=str(Path(__file__).resolve().parent),
                        help="where the temporary directory of HDF5 files is made")
    args = parser.parse_args(argv)

    nframes = args.frames
    distinct = make_frames()
    chunks = [bslz4.compress(fr) for fr in distinct]
    for _ in batches(distinct, nframes):  # build the batches before timing
        pass
    frame_mb = nframes * distinct[0].nbytes / 1e6
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.tmpdir))
    try:
        def frame_case(key, label, func, *fargs):
            path = tmp / f"{key}.h5"
            seconds = min(timed(lambda: func(path, *fargs))[0] for _ in range(args.repeats))
            with h5py.File(path, "r") as f:  # spot check: what was written reads back
                d = f["d"]
                assert d.shape == (nframes, *SHAPE), d.shape
                i = nframes - 1
                np.testing.assert_array_equal(d[i], distinct[i % len(distinct)])
            size = file_size(path)
            path.unlink()
            rows.append({"case": key, "what": label, "seconds": seconds,
                         "MB/s": frame_mb / seconds, "GB/s": frame_mb / seconds / 1e3,
                         "compression": frame_mb * 1e6 / size})
            print(f"  {key}: {seconds:.2f} s", flush=True)

        print(f"{nframes} frames {SHAPE} uint16, batches of {BATCH}; files in {tmp}")
        frame_case("a", "bare h5py, Bitshuffle(lz4) filter (baseline)",
                   bare_h5py_filter, distinct, nframes)
        frame_case("b", "DatasetAppender bslz4 (default workers)", appender_frames, distinct,
                   nframes)
        frame_case("b-pool2", "DatasetAppender bslz4, pool of 2", appender_frames, distinct,
                   nframes, 2)
        frame_case("b-pool0", "DatasetAppender bslz4, workers=0", appender_frames, distinct,
                   nframes, 0)
        frame_case("c", "bare h5py write_direct_chunk, precompressed", bare_direct_chunks,
                   chunks, nframes)
        frame_case("d", "DatasetAppender.append_compressed", appender_compressed, chunks,
                   nframes)
        base = rows[0]["seconds"]
        for r in rows:
            r["ratio"] = base / r["seconds"]

        npts = args.scalar_points
        values = scalar_batches(npts)
        scalar_mb = NCHANNELS * npts * 8 / 1e6
        srows = []
        for key, label, func in [("e-bare", "bare h5py, 64 ch, resize+write per batch",
                                  bare_h5py_scalars),
                                 ("e", "DatasetAppender, 64 ch", appender_scalars)]:
            path = tmp / f"{key}.h5"
            seconds, _ = timed(lambda: func(path, values, npts))
            with h5py.File(path, "r") as f:
                assert f["c63"].shape == (npts,)
                np.testing.assert_array_equal(f["c63"][-5:], values[-5:] + 63)
            size = file_size(path)
            path.unlink()
            srows.append({"case": key, "what": label, "seconds": seconds,
                          "MB/s": scalar_mb / seconds,
                          "points/s per channel": npts / seconds,
                          "channel values/s": NCHANNELS * npts / seconds,
                          "compression": scalar_mb * 1e6 / size})
            print(f"  {key}: {seconds:.2f} s", flush=True)
        for r in srows:
            r["ratio"] = srows[0]["seconds"] / r["seconds"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        from common import print_table, write_json
    except ImportError:  # keep the benchmark usable alone
        print_table = write_json = None
    cols = ["case", "what", "seconds", "MB/s", "GB/s", "ratio", "compression"]
    scols = ["case", "what", "seconds", "MB/s", "points/s per channel", "channel values/s",
             "ratio", "compression"]
    if print_table:
        print_table(f"Frames: {nframes} x 512x512 uint16 (ratio = speed vs a; MB/s of "
                    "uncompressed data)", rows, cols)
        print_table(f"Scalars: {NCHANNELS} float64 channels x {npts} points, batches of "
                    f"{SCALAR_BATCH} (ratio = speed vs bare h5py)", srows, scols)
    else:
        for r in rows + srows:
            print(r)
    if args.json:
        params = {"frames": nframes, "frame_shape": list(SHAPE), "batch": BATCH,
                  "channels": NCHANNELS, "scalar_points": npts,
                  "scalar_batch": SCALAR_BATCH, "cpus": os.cpu_count(),
                  "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
                  "hdf5plugin": hdf5plugin.version}
        if write_json:
            write_json(args.json, "storage", rows + srows, params)
        else:
            import json
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"params": params, "results": rows + srows},
                                                  indent=2))


if __name__ == "__main__":
    main()
