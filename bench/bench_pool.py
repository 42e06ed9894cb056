"""The writer pool: two scans of frames at once written by 2 writer processes vs 1 (same run),
and how long a scan waits for another writer after its writer is killed -9.

    python bench/bench_pool.py [--frames 200] [--rounds 2] [--kills 10] [--lease-ttl 5]
                               [--json bench/results/pool.json]

Writers are real `blisswriter run` processes on a private embedded server; the producer runs
here. Throughput: time from the first frame published (both scans at once, raw uint16 frames
that the writers compress with Bitshuffle+LZ4) until both scans' watermarks cover every
frame. Takeover: one scan fed a point every 20 ms; the writer holding it is killed -9, the time
until another writer holds its lease (and until its watermark moves again) is measured; the
killed writer is restarted before the next kill. Every point is checked in the file at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import detector_frames, print_table, write_json  # noqa: E402

from blissdata import DataStore, keys  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402
from writer.state.pool import read_writers  # noqa: E402


class Writers:
    """`blisswriter run` processes on one server."""

    def __init__(self, url: str, root: Path, lease_ttl_s: float, log_dir: Path):
        self.url, self.root, self.log_dir = url, root, log_dir
        self.config = log_dir / "writer.toml"
        self.config.write_text(f"lease_ttl_s = {lease_ttl_s}\nmax_lag_s = 0.5\n"
                               f"inactivity_timeout_s = 600\n")
        self.procs: list[subprocess.Popen] = []

    def start(self, store, n: int = 1) -> None:
        for _ in range(n):
            log = open(self.log_dir / f"writer-{len(self.procs)}.log", "ab")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "writer.commands.cli", "run", "--config", str(self.config),
                 "--redis", self.url, "--data-root", str(self.root)],
                stdout=log, stderr=subprocess.STDOUT))
        alive = lambda: {w["pid"] for w in read_writers(store.redis) if w["alive"]}  # noqa
        pids = {p.pid for p in self.procs if p.poll() is None}
        deadline = time.monotonic() + 60
        while not pids <= alive():
            if time.monotonic() > deadline:
                raise RuntimeError("writers did not register in 60 s")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []


def durable(store, scan_key, stream) -> int:
    raw = store.redis.hget(keys.durable_key(scan_key), stream)
    return json.loads(raw)["points"] if raw else 0


def holder_pid(store, scan_key) -> int | None:
    token = store.redis.get(keys.lease_key(scan_key))
    return int(token.decode().split("/")[0].split(":")[1].split("#")[0]) if token else None


def new_scan(store, root, number, name):
    return store.create_scan({"session": "bench", "name": name, "number": number,
                              "path": str(root / f"{name}_{number}.h5")},
                             {"title": name, "type": name, "scan_nb": number})


def two_scans_at_once(store, root, frames, number) -> tuple[float, set]:
    """Seconds from the first frame published to both scans durable; the writers used."""
    scans = [new_scan(store, root, number + i, "frames") for i in range(2)]
    streams = []
    for scan in scans:
        streams.append(scan.create_stream("cam:image", "uint16", frames.shape[1:]))
        scan.prepare()
        scan.start()
    t0 = time.perf_counter()
    for i in range(0, len(frames), 4):
        for s in streams:
            s.send(frames[i:i + 4])
    while not all(durable(store, scan.key, "cam:image") >= len(frames) for scan in scans):
        time.sleep(0.005)
    elapsed = time.perf_counter() - t0
    holders = {holder_pid(store, scan.key) for scan in scans}
    for scan in scans:
        scan.stop()
        scan.close()
    for scan in scans:  # done, file closed (lease released after)
        while store.redis.get(keys.lease_key(scan.key)) or store.redis.zscore(
                "blissdata:writer:unfinished", scan.key) is not None:
            time.sleep(0.01)
        store.delete_scan(scan.key)
        Path(scan.path).unlink(missing_ok=True)
    return elapsed, holders


def throughput(url, root, logs, frames, rounds, lease_ttl) -> list[dict]:
    store = DataStore(url)
    rows, number = [], 1
    mb = 2 * frames.nbytes / 1e6
    best = {}
    for _ in range(rounds):
        for n_writers in (1, 2):
            writers = Writers(url, root, lease_ttl, logs)
            writers.start(store, n_writers)
            try:
                elapsed, holders = two_scans_at_once(store, root, frames, number)
            finally:
                writers.stop_all()
            number += 2
            if elapsed < best.get(n_writers, (float("inf"),))[0]:
                best[n_writers] = (elapsed, len(holders))
    for n_writers in (1, 2):
        elapsed, used = best[n_writers]
        rows.append({"case": f"2 scans of frames, {n_writers} writer process(es)",
                     "writers used": used, "seconds": elapsed, "MB/s": mb / elapsed,
                     "ratio": best[1][0] / elapsed})
    store.close()
    return rows


def takeover(url, root, logs, kills, lease_ttl) -> dict:
    store = DataStore(url)
    writers = Writers(url, root, lease_ttl, logs)
    writers.start(store, 2)
    scan = new_scan(store, root, 1000, "takeover")
    diode = scan.create_stream("diode", "float64")
    scan.prepare()
    scan.start()
    sent = [0]
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            diode.send(np.array([float(sent[0])]))
            sent[0] += 1
            time.sleep(0.02)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    to_lease, to_data = [], []
    try:
        for _ in range(kills):
            while holder_pid(store, scan.key) is None or durable(store, scan.key, "diode") < 5:
                time.sleep(0.01)
            victim_pid = holder_pid(store, scan.key)
            victim = next(p for p in writers.procs if p.pid == victim_pid)
            victim.send_signal(signal.SIGKILL)
            t0 = time.perf_counter()
            victim.wait()
            before = durable(store, scan.key, "diode")
            while holder_pid(store, scan.key) in (None, victim_pid):
                time.sleep(0.005)
            to_lease.append(time.perf_counter() - t0)
            while durable(store, scan.key, "diode") <= before:
                time.sleep(0.005)
            to_data.append(time.perf_counter() - t0)
            writers.procs.remove(victim)
            writers.start(store, 1)  # back to two writers
    finally:
        stop.set()
        producer.join()
    scan.stop()
    scan.close()
    while store.redis.get(keys.lease_key(scan.key)) is not None or \
            store.redis.zscore("blissdata:writer:unfinished", scan.key) is not None:
        time.sleep(0.01)
    writers.stop_all()
    with h5py.File(scan.path, "r", locking=False) as f:
        got = f["1000.1/measurement/diode"][()]
    if not np.array_equal(got, np.arange(sent[0], dtype=float)):
        raise RuntimeError(f"takeover: the file holds {len(got)} points, not the {sent[0]} "
                           f"sent once each")
    store.close()
    return {"kills": kills, "lease_ttl_s": lease_ttl,
            "to_lease_p50_s": statistics.median(to_lease), "to_lease_max_s": max(to_lease),
            "to_data_p50_s": statistics.median(to_data), "to_data_max_s": max(to_data),
            "points_checked": sent[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per scan")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--lease-ttl", type=float, default=5.0)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "pool.json"))
    args = parser.parse_args(argv)
    frames = detector_frames(args.frames)
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        root, logs = Path(tmp) / "data", Path(tmp) / "logs"
        root.mkdir()
        logs.mkdir()
        rows = throughput(server.url, root, logs, frames, args.rounds, args.lease_ttl)
        print_table(f"Two scans of {args.frames} frames 512x512 uint16 at once, written "
                    f"with Bitshuffle+LZ4 ({os.cpu_count()} cores)", rows,
                    ["case", "writers used", "seconds", "MB/s", "ratio"])
        taken = takeover(server.url, root, logs, args.kills, args.lease_ttl)
        print_table(f"Takeover after kill -9 of the writer holding a running scan "
                    f"(lease_ttl_s = {args.lease_ttl}, {args.kills} kills)", [taken],
                    ["to_lease_p50_s", "to_lease_max_s", "to_data_p50_s", "to_data_max_s",
                     "points_checked"])
    write_json(args.json, "pool", rows + [taken],
               {"frames": args.frames, "rounds": args.rounds, "kills": args.kills,
                "lease_ttl_s": args.lease_ttl, "cpus": os.cpu_count()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
