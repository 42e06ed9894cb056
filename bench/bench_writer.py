"""Writer throughput and lag, from publish to flushed file, against bare h5py in the same run.

    python bench/bench_writer.py [--frames 1000] [--rounds 3] [--json bench/results/writer.json]

The writer runs as its own process (`blisswriter run`), the producer in this one, on a private
embedded server. "Throughput" is the time from the first publish until the writer's durable
watermark covers the last point (data flushed in the file). Baselines, in the same run:
bare h5py writing the same frames with the same filter (h5py's own filter path, one thread),
bare `write_direct_chunk` of the precompressed frames, bare h5py writing the scalars. Frame cases
run in rounds (each case once per round, best kept); each scan is deleted once written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, detector_frames, print_table, write_json  # noqa: E402

from blissdata import DataStore, keys  # noqa: E402
from blissdata import bslz4  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402

CHANNELS = 64


def durable(store, scan_key, stream) -> int:
    raw = store.redis.hget(keys.durable_key(scan_key), stream)
    return json.loads(raw)["points"] if raw else 0


def wait_durable(store, scan_key, streams, n, timeout=300) -> float:
    deadline = time.monotonic() + timeout
    while True:
        if all(durable(store, scan_key, s) >= n for s in streams):
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise RuntimeError(f"writer did not make {n} points durable in {timeout} s")
        time.sleep(0.002)


def new_scan(store, root, number, name):
    return store.create_scan({"session": "bench", "name": name, "number": number,
                              "path": str(root / f"{name}_{number}.h5")},
                             {"title": name, "type": name, "scan_nb": number})


def writer_frames(store, root, number, frames, precompressed) -> float:
    scan = new_scan(store, root, number, "frames")
    enc = "bslz4" if precompressed else "numeric"
    s = scan.create_stream("cam:image", "uint16", frames.shape[1:], encoding=enc)
    scan.prepare()
    scan.start()
    payload = [bslz4.compress(f) for f in frames] if precompressed else frames
    t0 = time.perf_counter()
    for i in range(0, len(frames), 4):
        if precompressed:
            s.send_chunks(payload[i:i + 4])
        else:
            s.send(payload[i:i + 4])
    t1 = wait_durable(store, scan.key, ["cam:image"], len(frames))
    finish(store, scan)
    return t1 - t0


def finish(store, scan) -> None:
    """Close the scan, wait for the writer to be done with it, then delete it and its file,
    so each measurement starts with Redis and the page cache as small as the first one."""
    scan.close()
    deadline = time.monotonic() + 60
    while True:
        raw = store.redis.hget(keys.writer_key(scan.key), "status")
        if raw and json.loads(raw)["state"] in ("done", "failed"):
            break
        assert time.monotonic() < deadline, "writer did not finish the scan"
        time.sleep(0.01)
    # the scan's own file (where its data is: docs/files.md) and the file linking to it
    files = {json.loads(v)["file"] for v in
             store.redis.hgetall(keys.durable_key(scan.key)).values()}
    store.delete_scan(scan.key)
    for path in files | {json.loads(raw)["file"]}:
        Path(path).unlink(missing_ok=True)


def writer_frames_backlog(store, root, number, frames, precompressed, proc) -> float:
    """The writer alone: frames published while the writer process is paused (SIGSTOP),
    then the time it takes, resumed, to make them durable (no producer competing for the
    2 cores)."""
    scan = new_scan(store, root, number, "backlog")
    enc = "bslz4" if precompressed else "numeric"
    s = scan.create_stream("cam:image", "uint16", frames.shape[1:], encoding=enc)
    scan.prepare()
    scan.start()
    deadline = time.monotonic() + 30
    while store.redis.hget(keys.writer_key(scan.key), "status") is None:
        assert time.monotonic() < deadline, "writer did not pick the scan up"
        time.sleep(0.01)
    time.sleep(0.2)  # its entry is open, its cursor waiting
    payload = [bslz4.compress(f) for f in frames] if precompressed else frames
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for i in range(0, len(frames), 4):
            if precompressed:
                s.send_chunks(payload[i:i + 4])
            else:
                s.send(payload[i:i + 4])
    finally:
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGCONT)
    t1 = wait_durable(store, scan.key, ["cam:image"], len(frames))
    finish(store, scan)
    return t1 - t0


def writer_scalars(store, root, number, n_points, batch=100) -> float:
    scan = new_scan(store, root, number, "scalars")
    streams = [scan.create_stream(f"c{c}", "float64") for c in range(CHANNELS)]
    scan.prepare()
    scan.start()
    data = np.random.default_rng(0).random(batch)
    t0 = time.perf_counter()
    for _ in range(n_points // batch):
        scan.send_many({s: data for s in streams})
    t1 = wait_durable(store, scan.key, [s.name for s in streams], n_points)
    scan.close()
    return t1 - t0


def writer_lag(store, root, number, rate_hz, seconds, frame) -> list[float]:
    """Publish one frame + 8 counters per point at `rate_hz`; lag of each point until durable."""
    scan = new_scan(store, root, number, "lag")
    cam = scan.create_stream("cam:image", "uint16", frame.shape)
    counters = [scan.create_stream(f"ct{c}", "float64") for c in range(8)]
    scan.prepare()
    scan.start()
    published, lags = [], []
    n = int(rate_hz * seconds)
    t_start = time.perf_counter()
    next_check = 0
    for i in range(n):
        target = t_start + i / rate_hz
        while time.perf_counter() < target:
            time.sleep(0.0005)
        scan.send_many({cam: frame, **{c: float(i) for c in counters}})
        published.append(time.perf_counter())
        if i % 5 == 0:
            d = durable(store, scan.key, "cam:image")
            now = time.perf_counter()
            while next_check < d:
                lags.append(now - published[next_check])
                next_check += 1
    while next_check < n:
        d = durable(store, scan.key, "cam:image")
        now = time.perf_counter()
        while next_check < d:
            lags.append(now - published[next_check])
            next_check += 1
        time.sleep(0.002)
    scan.close()
    return lags


def bare_h5py_frames(path, frames) -> float:
    def go():
        with h5py.File(path, "w") as f:
            d = f.create_dataset("data", shape=(0, *frames.shape[1:]),
                                 maxshape=(None, *frames.shape[1:]), dtype=frames.dtype,
                                 chunks=(1, *frames.shape[1:]),
                                 **hdf5plugin.Bitshuffle(cname="lz4"))
            for i in range(0, len(frames), 4):
                d.resize(i + len(frames[i:i + 4]), axis=0)
                d[i:i + 4] = frames[i:i + 4]
    return best_of(2, go)


def bare_direct_chunks(path, frames) -> float:
    chunks = [bslz4.compress(f) for f in frames]

    def go():
        with h5py.File(path, "w") as f:
            d = f.create_dataset("data", shape=frames.shape, dtype=frames.dtype,
                                 chunks=(1, *frames.shape[1:]),
                                 **hdf5plugin.Bitshuffle(cname="lz4"))
            for i, c in enumerate(chunks):
                d.id.write_direct_chunk((i, 0, 0), c)
    return best_of(2, go)


def bare_h5py_scalars(path, n_points, batch=100) -> float:
    data = np.random.default_rng(0).random(batch)

    def go():
        with h5py.File(path, "w") as f:
            ds = [f.create_dataset(f"c{c}", shape=(n_points,), dtype="f8",
                                   chunks=(min(n_points, 131072),),
                                   **hdf5plugin.Bitshuffle(cname="lz4")) for c in range(CHANNELS)]
            for i in range(0, n_points, batch):
                for d in ds:
                    d[i:i + batch] = data
    return best_of(1, go)


def big_mapping(groups=2000):
    """10,000 nodes: 2,000 positioner groups of 4 static datasets, half with units."""
    return [{"NX_class": "NXentry"}, {f"g{i}": [{"NX_class": "NXpositioner"}, {
        f"d{j}": [{"units": "mm"} if j % 2 else {}, "RAW", 1.5 if j % 2 else "text"]
        for j in range(4)}] for i in range(groups)}]


def skeleton_times(root) -> tuple[float, float]:
    """(bare h5py creating the same nodes, parse_mapping + write_entry), best of 3."""
    from writer.scan.mapping import parse_mapping
    from writer.scan.nexus_skeleton import write_entry
    mapping = big_mapping()

    def bare():
        with h5py.File(root / "skeleton_bare.h5", "w") as f:
            entry = f.create_group("1.1")
            entry.attrs["NX_class"] = "NXentry"
            for gname, (gattrs, children) in mapping[1].items():
                g = entry.create_group(gname)
                g.attrs.update(gattrs)
                for dname, (dattrs, _kind, value) in children.items():
                    g[dname] = value
                    g[dname].attrs.update(dattrs)

    def ours():
        with h5py.File(root / "skeleton.h5", "w") as f:
            write_entry(f, "1.1", parse_mapping(mapping), {})
    return best_of(3, bare), best_of(3, ours)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--scalar-points", type=int, default=100_000)
    parser.add_argument("--lag-rate", type=float, default=50.0, help="points/s for the lag run")
    parser.add_argument("--lag-seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/writer.json")
    args = parser.parse_args(argv)
    frames = detector_frames(args.frames)
    mb = frames.nbytes / 1e6
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as tmp, EmbeddedRedis() as server:
        root = Path(tmp)
        t_h5s = bare_h5py_scalars(root / "bare_scalars.h5", args.scalar_points)
        t_skel_bare, t_skel = skeleton_times(root)
        log = open(root / "writer.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--redis",
                                 server.url, "--data-root", str(root)], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            store = DataStore(server.url)
            time.sleep(1.0)
            # rounds, each case once per round, best of each: the drifts of a shared
            # machine hit baselines and writer alike
            times = {k: [] for k in ("h5", "direct", "w", "wz", "wb", "wbz")}
            number = iter(range(10, 10**6))
            for _ in range(args.rounds):
                times["h5"].append(bare_h5py_frames(root / "bare.h5", frames))
                times["direct"].append(bare_direct_chunks(root / "bare_direct.h5", frames))
                times["w"].append(writer_frames(store, root, next(number), frames, False))
                times["wz"].append(writer_frames(store, root, next(number), frames, True))
                times["wb"].append(
                    writer_frames_backlog(store, root, next(number), frames, False, proc))
                times["wbz"].append(
                    writer_frames_backlog(store, root, next(number), frames, True, proc))
            t_h5, t_direct, t_w, t_wz, t_wb, t_wbz = (min(times[k]) for k in times)
            t_ws = writer_scalars(store, root, 5, args.scalar_points)
            lags = writer_lag(store, root, 6, args.lag_rate, args.lag_seconds, frames[0])
        finally:
            proc.terminate()
            proc.wait(30)
    rows.append({"case": "frames 512x512 u16 bslz4: bare h5py filter, 1 thread (baseline)",
                 "MB/s": mb / t_h5, "ratio": 1.0})
    rows.append({"case": "frames: writer, publish -> durable in file", "MB/s": mb / t_w,
                 "ratio": t_h5 / t_w})
    rows.append({"case": "frames: writer alone on a backlog (producer paused it)",
                 "MB/s": mb / t_wb, "ratio": t_h5 / t_wb})
    rows.append({"case": "precompressed frames: bare write_direct_chunk (baseline)",
                 "MB/s": mb / t_direct, "ratio": 1.0})
    rows.append({"case": "precompressed frames: writer, publish -> durable (uncompressed MB/s)",
                 "MB/s": mb / t_wz, "ratio": t_direct / t_wz})
    rows.append({"case": "precompressed frames: writer alone on a backlog",
                 "MB/s": mb / t_wbz, "ratio": t_direct / t_wbz})
    values = args.scalar_points * CHANNELS
    rows.append({"case": "scalars 64 ch: bare h5py, batches of 100 (baseline)",
                 "points/s": args.scalar_points / t_h5s, "values/s": values / t_h5s,
                 "ratio": 1.0})
    rows.append({"case": "scalars 64 ch: writer, publish -> durable",
                 "points/s": args.scalar_points / t_ws, "values/s": values / t_ws,
                 "ratio": t_h5s / t_ws})
    lags_ms = np.array(lags) * 1000
    rows.append({"case": f"lag at {args.lag_rate:g} Hz (frame + 8 counters per point), ms",
                 "p50 ms": float(np.percentile(lags_ms, 50)),
                 "p99 ms": float(np.percentile(lags_ms, 99)),
                 "max ms": float(lags_ms.max())})
    rows.append({"case": "10,000-node mapping: bare h5py creating the nodes (baseline)",
                 "seconds": t_skel_bare, "ratio": 1.0})
    rows.append({"case": "10,000-node mapping: validate + parse + write the entry",
                 "seconds": t_skel, "ratio": t_skel_bare / t_skel})
    print_table("Writer (ratio = baseline time / writer time, same run)", rows,
                ["case", "MB/s", "points/s", "values/s", "seconds", "ratio", "p50 ms", "p99 ms",
                 "max ms"])
    write_json(args.json, "writer", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
