"""Reading points trimmed from Redis (they come from the writer's file) against bare h5py, and
the memory tracker's overhead on publishing, in one run.

    python bench/bench_read.py [--json bench/results/read.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, detector_frames, print_table, write_json  # noqa: E402

from blissdata import DataStore  # noqa: E402
from blissdata.memory_tracker import MemoryTracker  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--single-reads", type=int, default=500)
    parser.add_argument("--json", default="bench/results/read.json")
    args = parser.parse_args(argv)
    frames = detector_frames(args.frames)
    scalars = np.random.default_rng(0).random(100_000)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis() as server:
        path = Path(tmp) / "scan.h5"
        with h5py.File(path, "w", libver="latest") as f:  # as the writer: chunked, compressed
            f.create_dataset("cam", data=frames, chunks=(1, *frames.shape[1:]),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
            f.create_dataset("x", data=scalars, chunks=(65536,),
                             **hdf5plugin.Bitshuffle(cname="lz4"))
        store = DataStore(server.url)
        scan = store.create_scan({"session": "b", "name": "b", "number": 1, "path": str(path)},
                                 {"title": "b", "type": "b", "scan_nb": 1})
        cam = scan.create_stream("cam", "uint16", frames.shape[1:])
        x = scan.create_stream("x", "float64")
        scan.prepare()
        for i in range(0, len(frames), 4):
            cam.send(frames[i:i + 4])
        for i in range(0, len(scalars), 1000):
            x.send(scalars[i:i + 1000])
        scan.close()
        cam.mark_file_backed(str(path), "/cam", len(frames))
        x.mark_file_backed(str(path), "/x", len(scalars))
        MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()
        reader = DataStore(server.url).load_scan(scan.key)
        rcam, rx = reader.streams["cam"], reader.streams["x"]
        lo, hi = 10, len(frames) - 10
        f = h5py.File(path, "r", swmr=True, locking=False)  # README's recipe (and ours)

        t_h5 = best_of(3, lambda: f["cam"][lo:hi])
        t_api = best_of(3, lambda: rcam[lo:hi])
        mb = frames[lo:hi].nbytes / 1e6
        rows.append({"case": f"trimmed frames [{lo}:{hi}]: bare h5py (baseline)",
                     "MB/s": mb / t_h5, "ratio": 1.0})
        rows.append({"case": "trimmed frames: Stream[a:b] (file fallback)", "MB/s": mb / t_api,
                     "ratio": t_h5 / t_api})
        t_h5 = best_of(3, lambda: f["x"][1000:90000])
        t_api = best_of(3, lambda: rx[1000:90000])
        rows.append({"case": "trimmed scalars [1000:90000]: bare h5py (baseline)",
                     "MB/s": 89000 * 8 / 1e6 / t_h5, "ratio": 1.0})
        rows.append({"case": "trimmed scalars: Stream[a:b]", "MB/s": 89000 * 8 / 1e6 / t_api,
                     "ratio": t_h5 / t_api})
        rng = np.random.default_rng(1)
        rcam[0]  # file opened once, then reused
        lat = []
        for i in rng.integers(0, hi, args.single_reads):
            t0 = time.perf_counter()
            rcam[int(i)]
            lat.append(time.perf_counter() - t0)
        lat_h5 = []
        for i in rng.integers(0, hi, args.single_reads):
            t0 = time.perf_counter()
            f["cam"][int(i)]
            lat_h5.append(time.perf_counter() - t0)
        rows.append({"case": "single trimmed frame, file open: bare h5py",
                     "p50 ms": 1e3 * float(np.median(lat_h5)),
                     "p99 ms": 1e3 * float(np.percentile(lat_h5, 99))})
        rows.append({"case": "single trimmed frame, file open: stream[i]",
                     "p50 ms": 1e3 * float(np.median(lat)),
                     "p99 ms": 1e3 * float(np.percentile(lat, 99))})
        f.close()

        def publish(n):
            s = store.create_scan({"session": "b", "name": "p", "number": n, "path": "/x"},
                                  {"title": "p", "type": "p", "scan_nb": n})
            c = s.create_stream("cam", "uint16", frames.shape[1:])
            s.prepare()
            for i in range(0, len(frames), 4):
                c.send(frames[i:i + 4])
            s.close()
            store.delete_scan(s.key)

        counter = iter(range(10, 10**6))
        plain, tracked = [], []
        for _ in range(5):  # alternate, so drifts of a shared machine hit both alike
            plain.append(best_of(1, lambda: publish(next(counter))))
            tracker = MemoryTracker(DataStore(server.url), budget_bytes=2**40)  # 1 s rounds
            thread = threading.Thread(target=tracker.run, daemon=True)
            thread.start()
            tracked.append(best_of(1, lambda: publish(next(counter))))
            tracker.stop()
            thread.join()
        t_plain, t_tracked = min(plain), min(tracked)
        rows.append({"case": "publishing frames, no tracker (baseline)",
                     "MB/s": frames.nbytes / 1e6 / t_plain, "ratio": 1.0})
        rows.append({"case": "publishing frames, tracker running (1 s rounds)",
                     "MB/s": frames.nbytes / 1e6 / t_tracked, "ratio": t_plain / t_tracked})
    print_table("Reading trimmed data, tracker overhead (ratio = baseline time / ours)", rows,
                ["case", "MB/s", "ratio", "p50 ms", "p99 ms"])
    write_json(args.json, "read", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
