"""What the write path costs for slow scans, many channels and fast scalars: writer CPU, RSS,
lag and the file's bytes outside its data, each against a baseline measured in the same run.

    python bench/bench_write_cost.py [--slow-seconds 20] [--rounds 3] [--writer-code DIR]
                                     [--json bench/results/write_cost.json]

Every load runs on a fresh writer process (`blisswriter run`, default configuration:
max_lag_s 1, memory_budget_mb 512) on a private embedded server; the producer runs in this
process. Measures:

* slow scan: N float64 channels at 10 Hz (header: npoints, count_time 0.1): the writer's CPU
  (its user + system times over the scan's wall time, % of one core) and the lag of each point
  until durable (p99); the issue's runs lasted 120 s, these `--slow-seconds`.
* RSS vs channels: the writer's peak RSS (VmHWM) for N float64 channels x `--rss-points`
  points in batches of 100, against `memory_budget_mb`.
* file overhead: the scan's own file size minus the stored bytes of every dataset minus HDF5's
  metadata, as a share of the file. The metadata is measured, not guessed: the same objects
  copied with HDF5 (H5Ocopy: same chunks, filters and stored chunks) into a new file in one go;
  that file's bytes outside its datasets' storage are the metadata.
* size spread: the same published data written twice at different paces (a live producer,
  and a backlog the writer finds once resumed); (largest - smallest) / smallest.
* fast scalars: 64 float64 channels x `--scalar-points` in batches of 100 (the same values
  everywhere), `--rounds` interleaved rounds (a noisy moment hits every writer alike), each
  writer a fresh process per round; the figure is the median round. Baseline: ESRF's
  blisswriter 3.0.0 in the same run, with the real blissdata 2.4.5 publishing (the reference
  venv of tests/bliss2_env.py, its own process) to a valkey-server with RedisJSON and
  RediSearch. Measured per writer: the CPU (user + system, every thread) of the writer
  process from just before the scan is created (making the entry and its 64 datasets
  counts) to its file complete: blisswriter 3.0.0 and `--protocol blissdata2` let go of the
  file with the final h5maps in it, ours natively says "done" (every point durable, file
  closed). Not counted: start-up and imports, the producer, Redis, this process polling.
  Writers: blisswriter 3.0.0 (its defaults: scalars uncompressed, contiguous, in the file
  only at the end of the scan); this writer on the same blissdata 2 scan (`--protocol
  blissdata2`: the apples-to-apples load); this writer on its own protocol (this project's
  blissdata publishing from this process: one MULTI/EXEC per batch of 64 sends). Ours keep
  their promises while doing it: points durable within `max_lag_s`, watermarks published,
  the lease checked. Also: bare h5py writing the same batches (this process's CPU, no
  Redis), and the native load again from a backlog (the writer stopped while the scan is
  published, for the size spread below). `--writer-code DIR` runs this writer from another
  copy of the code (before/after figures, each against blisswriter 3.0.0 in its own run).
* concurrent: 16 scans, each a 256x256 uint16 frame + 4 counters at 50 Hz: lag p99 of the
  counters and the frames, writer CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (filters for reading the files)
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_bliss2 import complete  # noqa: E402
from bliss2_env import Bliss2EnvUnavailable, reference_env  # noqa: E402
from common import print_table, write_json  # noqa: E402

from blissdata import DataStore, keys  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402
from writer.hdf5.file_space import file_space  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


WRITER_CODE: str | None = None  # --writer-code: run this writer from that copy of the code


def writer_code() -> dict:
    """Popen arguments running this writer from WRITER_CODE (else as installed)."""
    if WRITER_CODE is None:
        return {}
    return {"cwd": WRITER_CODE, "env": {**os.environ, "PYTHONPATH": WRITER_CODE}}


def writer_cli() -> str:
    """The module of `blisswriter` in the code run: writer.cli before writer/ had rooms."""
    if WRITER_CODE is not None and not (Path(WRITER_CODE) / "writer" / "commands").is_dir():
        return "writer.cli"
    return "writer.commands.cli"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Writer:
    """A fresh `blisswriter run` process for one load."""

    def __init__(self, url: str, root: Path, name: str):
        self.log = open(root / f"writer-{name}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", writer_cli(), "run", "--redis",
                                      url, "--data-root", str(root)], stdout=self.log,
                                     stderr=subprocess.STDOUT, **writer_code())
        time.sleep(1.5)

    @property
    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    @property
    def rss_peak_mb(self) -> float:
        return rss_peak_mb(self.proc.pid)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def durable(store, scan_key, stream) -> int:
    raw = store.redis.hget(keys.durable_key(scan_key), stream)
    return json.loads(raw)["points"] if raw else 0


def wait_done(store, scan_key, timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        raw = store.redis.hget(keys.writer_key(scan_key), "status")
        if raw and json.loads(raw)["state"] in ("done", "failed"):
            status = json.loads(raw)
            if status["state"] == "failed":
                raise RuntimeError(f"scan failed: {status.get('error')}")
            return status
        if time.monotonic() > deadline:
            raise RuntimeError("writer did not finish the scan")
        time.sleep(0.01)


def wait_picked(store, scan_key) -> None:
    deadline = time.monotonic() + 30
    while store.redis.hget(keys.writer_key(scan_key), "status") is None:
        assert time.monotonic() < deadline, "writer did not pick the scan up"
        time.sleep(0.01)
    time.sleep(0.3)


def scan_file(store, scan_key) -> str:
    for v in store.redis.hgetall(keys.durable_key(scan_key)).values():
        return json.loads(v)["file"]
    raise RuntimeError("no durable watermark")


def new_scan(store, root, number, name, info=None):
    return store.create_scan({"session": "bench", "name": name, "number": number,
                              "path": str(root / f"{name}.h5")},
                             {"title": name, "type": name, "scan_nb": number, **(info or {})})


def file_overhead(path: str, tmp: Path) -> dict:
    """Bytes outside the datasets' stored data and HDF5's metadata (writer.hdf5.file_space)."""
    space = file_space(path, tmp)
    return {"file MB": space.size / 1e6, "data MB": space.stored / 1e6,
            "metadata MB": space.metadata / 1e6, "overhead %": 100 * space.outside_share}


# ---- loads ----------------------------------------------------------------------------
def slow_scan(url, root, channels, seconds, rate=10.0) -> dict:
    writer = Writer(url, root, f"slow{channels}")
    try:
        store = DataStore(url)
        n = int(rate * seconds)
        scan = new_scan(store, root, channels, f"slow{channels}",
                        {"npoints": n, "count_time": 1 / rate})
        streams = [scan.create_stream(f"c{c}", "float64") for c in range(channels)]
        scan.prepare()
        scan.start()
        wait_picked(store, scan.key)
        values = np.random.default_rng(channels).random(channels)
        published, lags, seen = [], [], 0
        cpu0, t0 = writer.cpu, time.perf_counter()
        for i in range(n):
            target = t0 + i / rate
            while (now := time.perf_counter()) < target:
                time.sleep(min(0.005, target - now))
            scan.send_many({s: values[c:c + 1] for c, s in enumerate(streams)})
            published.append(time.perf_counter())
            d = min(durable(store, scan.key, "c0"), durable(store, scan.key, f"c{channels-1}"))
            now = time.perf_counter()
            while seen < d:
                lags.append(now - published[seen])
                seen += 1
        while seen < n:
            d = min(durable(store, scan.key, "c0"), durable(store, scan.key, f"c{channels-1}"))
            now = time.perf_counter()
            while seen < d:
                lags.append(now - published[seen])
                seen += 1
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        cpu = writer.cpu - cpu0
        scan.close()
        wait_done(store, scan.key)
        path = scan_file(store, scan.key)
        row = {"load": f"slow scan {channels} ch x 10 Hz, {seconds:g} s",
               "cpu %": 100 * cpu / wall, "lag p99 s": float(np.percentile(lags, 99)),
               "lag max s": float(max(lags)), "rss MB": writer.rss_peak_mb}
        row.update(file_overhead(path, root))
        return row
    finally:
        writer.close()


def many_channels(url, root, channels, points, batch=100) -> dict:
    writer = Writer(url, root, f"rss{channels}")
    try:
        store = DataStore(url)
        scan = new_scan(store, root, 100000 + channels, f"rss{channels}", {"npoints": points})
        streams = [scan.create_stream(f"c{c}", "float64") for c in range(channels)]
        scan.prepare()
        scan.start()
        wait_picked(store, scan.key)
        data = np.random.default_rng(0).random(batch)
        for _ in range(points // batch):
            scan.send_many({s: data for s in streams})
        scan.close()
        wait_done(store, scan.key, timeout=600)
        path = scan_file(store, scan.key)
        row = {"load": f"{channels} ch x {points} points", "rss MB": writer.rss_peak_mb}
        row.update(file_overhead(path, root))
        return row
    finally:
        writer.close()


def fast_scalars(url, root, points, paused=False, channels=64, batch=100, round_=0) -> dict:
    name = "fastpaused" if paused else f"fast{round_}"
    writer = Writer(url, root, name)
    try:
        store = DataStore(url)
        cpu0 = writer.cpu  # from the scan's creation, as for blissdata 2 (the entry counts)
        scan = new_scan(store, root, 200 + round_ if not paused else 2, name,
                        {"npoints": points, "count_time": 0.001})
        streams = [scan.create_stream(f"c{c}", "float64") for c in range(channels)]
        scan.prepare()
        scan.start()
        wait_picked(store, scan.key)
        rng = np.random.default_rng(0)
        batches = [rng.random(batch) for _ in range(8)]
        if paused:
            os.kill(writer.proc.pid, signal.SIGSTOP)
        t0 = time.perf_counter()
        for i in range(points // batch):
            scan.send_many({s: batches[(i + c) % 8] for c, s in enumerate(streams)})
        if paused:
            os.kill(writer.proc.pid, signal.SIGCONT)
        scan.close()
        wait_done(store, scan.key)
        cpu, wall = writer.cpu - cpu0, time.perf_counter() - t0
        path = scan_file(store, scan.key)
        row = {"load": f"fast scalars {channels} ch x {points}" + (", backlog" if paused else ""),
               "cpu s": cpu, "wall s": wall, "rss MB": writer.rss_peak_mb}
        row.update(file_overhead(path, root))
        if not paused:
            Path(path).unlink()
        return row
    finally:
        writer.close()


def bliss2_scalars(env, root: Path, writer: str, number: int, points: int, channels=64,
                   batch=100) -> dict:
    """The fast-scalar load published by the real blissdata 2.4.5 (its own process) on a
    fresh valkey-server with the modules, written by a fresh `writer` process: "blisswriter
    3.0.0" or "ours" (`--protocol blissdata2`). The writer's CPU from just before the scan
    is created to its file complete."""
    with EmbeddedRedis(extra_args=env.server_args()) as server:
        env.publish(server.url, "init")
        folder = root / f"bliss2-{number}"
        folder.mkdir()
        command = ([env.blisswriter, "run", server.url] if writer == "blisswriter 3.0.0" else
                   [sys.executable, "-m", writer_cli(), "run", "--protocol", "blissdata2",
                    "--redis", server.url, "--data-root", str(root)])
        with open(folder / "writer.log", "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    **(writer_code() if writer == "ours" else {"cwd": "/"}))
        try:
            time.sleep(2.0)  # imported and following the scans before the first one
            path, entry = folder / "scan.h5", f"{number}.1"
            cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            env.publish(server.url, "bench_scalars", path, number, f"channels={channels}",
                        f"npoints={points}", f"batch={batch}", timeout=1800)
            deadline = time.monotonic() + 600
            while not complete(path, entry):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{writer} did not complete {path}: "
                                       f"{(folder / 'writer.log').read_text()[-2000:]}")
                time.sleep(0.02)
            cpu, wall = cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
            rss = rss_peak_mb(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with h5py.File(path, "r") as f:
        n = f[f"{entry}/measurement/ct{channels - 1}"].shape[0]
    if n != points:
        raise RuntimeError(f"{writer}: {n} points in {path}, expected {points}")
    size = path.stat().st_size
    path.unlink()
    return {"cpu s": cpu, "wall s": wall, "rss MB": rss, "file MB": size / 1e6}


def bare_scalars(root, points, channels=64, batch=100) -> float:
    """CPU of bare h5py appending the same batches (resize + write per batch), bslz4."""
    rng = np.random.default_rng(0)
    batches = [rng.random(batch) for _ in range(8)]
    t0 = time.process_time()
    with h5py.File(root / "bare.h5", "w", libver="latest") as f:
        dsets = [f.create_dataset(f"c{c}", shape=(0,), maxshape=(None,), chunks=(131072,),
                                  dtype="f8", **hdf5plugin.Bitshuffle()) for c in range(channels)]
        for i in range(points // batch):
            for c, d in enumerate(dsets):
                d.resize((i + 1) * batch, axis=0)
                d[i * batch:] = batches[(i + c) % 8]
    cpu = time.process_time() - t0
    (root / "bare.h5").unlink()
    return cpu


def concurrent(url, root, n_scans=16, rate=50.0, seconds=6.0) -> dict:
    writer = Writer(url, root, "concurrent")
    try:
        store = DataStore(url)
        frame = np.random.default_rng(0).poisson(20, (256, 256)).astype(np.uint16)
        scans, lags = [], {"frame": [], "counter": []}
        for k in range(n_scans):
            scan = new_scan(store, root, 1000 + k, f"conc{k}",
                            {"npoints": int(rate * seconds), "count_time": 1 / rate})
            cam = scan.create_stream("cam:image", "uint16", frame.shape)
            cts = [scan.create_stream(f"ct{c}", "float64") for c in range(4)]
            scan.prepare()
            scan.start()
            scans.append((scan, cam, cts))
        for scan, _, _ in scans:
            wait_picked(store, scan.key)
        n = int(rate * seconds)
        lock = threading.Lock()

        def produce(scan, cam, cts):
            s = DataStore(url)
            sc = s.load_scan(scan.key)
            cam_s, ct_s = sc.streams[cam.name], [sc.streams[c.name] for c in cts]
            published, seen = [], {"cam:image": 0, "ct0": 0}
            my = {"frame": [], "counter": []}
            t0 = time.perf_counter()

            def check(now):
                for stream, kind in (("cam:image", "frame"), ("ct0", "counter")):
                    d = durable(s, scan.key, stream)
                    while seen[stream] < d:
                        my[kind].append(now - published[seen[stream]])
                        seen[stream] += 1
            for i in range(n):
                target = t0 + i / rate
                while (now := time.perf_counter()) < target:
                    time.sleep(min(0.002, target - now))
                cam_s.send(frame[np.newaxis])
                for c in ct_s:
                    c.send(np.array([float(i)]))
                published.append(time.perf_counter())
                if i % 5 == 0:
                    check(time.perf_counter())
            while min(seen.values()) < n:
                check(time.perf_counter())
                time.sleep(0.005)
            sc.close()
            with lock:
                for k in my:
                    lags[k].extend(my[k])

        cpu0, t0 = writer.cpu, time.perf_counter()
        threads = [threading.Thread(target=produce, args=s) for s in scans]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cpu, wall = writer.cpu - cpu0, time.perf_counter() - t0
        for scan, _, _ in scans:
            wait_done(store, scan.key)
        return {"load": f"{n_scans} scans: 256x256 frame + 4 counters at {rate:g} Hz",
                "cpu %": 100 * cpu / wall,
                "lag p99 s": float(np.percentile(lags["counter"] + lags["frame"], 99)),
                "lag max s": float(max(lags["counter"] + lags["frame"])),
                "rss MB": writer.rss_peak_mb}
    finally:
        writer.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-seconds", type=float, default=20.0)
    parser.add_argument("--slow-channels", default="16,64,256")
    parser.add_argument("--rss-channels", default="8,256,1024,4096")
    parser.add_argument("--rss-points", type=int, default=2000)
    parser.add_argument("--scalar-points", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3, help="fast-scalar rounds")
    parser.add_argument("--concurrent-seconds", type=float, default=6.0)
    parser.add_argument("--json", default="bench/results/write_cost.json")
    parser.add_argument("--writer-code", help="run this writer from the code in that folder "
                        "(e.g. `git archive <commit> blissdata writer | tar -x -C DIR`): before/after figures")
    args = parser.parse_args(argv)
    global WRITER_CODE
    WRITER_CODE = args.writer_code and str(Path(args.writer_code).resolve())
    try:
        env = reference_env()
    except Bliss2EnvUnavailable as exc:
        print(f"bench_write_cost: no blisswriter 3.0.0 to compare with: {exc}", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp, EmbeddedRedis() as server:
        root = Path(tmp)
        points = args.scalar_points
        rounds = {"blisswriter 3.0.0": [], "ours, blissdata2": [], "ours": [], "bare": []}
        for round_ in range(args.rounds):  # interleaved: a noisy moment hits all alike
            rounds["bare"].append({"cpu s": bare_scalars(root, points)})
            rounds["blisswriter 3.0.0"].append(
                bliss2_scalars(env, root, "blisswriter 3.0.0", 300 + 2 * round_, points))
            rounds["ours, blissdata2"].append(
                bliss2_scalars(env, root, "ours", 301 + 2 * round_, points))
            rounds["ours"].append(fast_scalars(server.url, root, points, round_=round_))
            print(f"round {round_}: CPU s " + ", ".join(
                f"{k} {v[-1]['cpu s']:.2f}" for k, v in rounds.items()), flush=True)
        reference = float(np.median([r["cpu s"] for r in rounds["blisswriter 3.0.0"]]))
        labels = {"blisswriter 3.0.0": "blisswriter 3.0.0, blissdata 2.4.5 publishing "
                                       "(baseline)",
                  "ours, blissdata2": "this writer, same blissdata 2.4.5 scan "
                                      "(--protocol blissdata2)",
                  "ours": "this writer, its own protocol",
                  "bare": "bare h5py appending the same batches (no Redis)"}
        for kind, found in rounds.items():
            cpu = float(np.median([r["cpu s"] for r in found]))
            row = {**found[len(found) // 2], "load": f"fast scalars 64 ch x {points}: "
                   f"{labels[kind]}", "cpu s": cpu, "ratio": reference / cpu,
                   "rounds cpu s": [round(r["cpu s"], 3) for r in found]}
            if "wall s" in row:
                row["wall s"] = float(np.median([r["wall s"] for r in found]))
            rows.append(row)
        fast = rows[2]
        backlog = fast_scalars(server.url, root, points, paused=True)
        backlog["ratio"] = reference / backlog["cpu s"]
        spread = abs(fast["file MB"] - backlog["file MB"]) / min(fast["file MB"],
                                                                   backlog["file MB"])
        fast["size spread %"] = backlog["size spread %"] = 100 * spread
        rows.append(backlog)
        for channels in (int(c) for c in args.slow_channels.split(",") if c):
            rows.append(slow_scan(server.url, root, channels, args.slow_seconds))
        for channels in (int(c) for c in args.rss_channels.split(",") if c):
            rows.append(many_channels(server.url, root, channels, args.rss_points))
        if args.concurrent_seconds > 0:
            rows.append(concurrent(server.url, root, seconds=args.concurrent_seconds))
    print_table("Write cost (fast scalars: median of the rounds, ratio = blisswriter 3.0.0 "
                "CPU / this CPU, same run; memory budget 512 MB, max_lag_s 1)", rows,
                ["load", "cpu %", "cpu s", "ratio", "rounds cpu s", "wall s", "lag p99 s", "lag max s", "rss MB",
                 "file MB", "data MB", "metadata MB", "overhead %", "size spread %"])
    write_json(args.json, "write_cost", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
