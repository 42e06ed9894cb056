"""`blisswriter serve`: time to answer h5web's first requests (opening a scan at its entry's
default plot) and the bytes sent, against bare h5py reading the same things, in one run.

    python bench/bench_web.py [--frames 1000] [--channels 64] [--points 100000]
                              [--json bench/results/web.json]

Two scans as the writer lays them out: 1000 frames 512x512 uint16 (Bitshuffle+LZ4, one frame
per chunk) and 64 scalar channels x 100k points (float64, uncompressed). The requests are
those h5web sent in tests/test_web_browser.py when it opened an entry: the root, the entry
and its attributes, the NXdata group and its attributes, then the signal's values (one frame
for an image stack, the whole line for a counter) and the axis. The server is the real
process (loopback, one persistent connection, requests one after the other); h5py opens the
file once and reads the same metadata, attributes and slices. Page cache warm.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from common import best_of, detector_frames, print_table, write_json  # noqa: E402
from web_helpers import start_serve  # noqa: E402


def write_frames_scan(path: Path, n: int) -> None:
    frames = detector_frames(min(n, 64))
    with h5py.File(path, "w", libver="latest") as f:
        entry = _entry(f)
        det = entry.create_group("instrument/cam")
        det.attrs["NX_class"] = "NXdetector"
        data = det.create_dataset("data", shape=(n, 512, 512), dtype="uint16",
                                  chunks=(1, 512, 512), **hdf5plugin.Bitshuffle(cname="lz4"))
        for i in range(0, n, len(frames)):
            data[i:i + len(frames)] = frames[:n - i]
        entry["instrument/elapsed_time"] = np.arange(n) * 0.1
        _plot(entry, "/1.1/instrument/cam/data", "/1.1/instrument/elapsed_time")


def write_scalars_scan(path: Path, channels: int, points: int) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w", libver="latest") as f:
        entry = _entry(f)
        measurement = entry.create_group("measurement")
        for k in range(channels):
            measurement.create_dataset(f"ch{k:02d}", data=rng.random(points),
                                       chunks=(min(points, 16384),))
        _plot(entry, "/1.1/measurement/ch01", "/1.1/measurement/ch00")


def _entry(f):
    f.attrs["default"] = "1.1"
    entry = f.create_group("1.1")
    entry.attrs.update({"NX_class": "NXentry", "default": "plotselect"})
    entry["title"] = "bench scan"
    return entry


def _plot(entry, signal: str, axis: str) -> None:
    plot = entry.create_group("plotselect")
    plot.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": ["x"]})
    plot["data"] = h5py.SoftLink(signal)
    plot["x"] = h5py.SoftLink(axis)


def first_requests(signal_selection: str | None) -> list[tuple[str, str, dict]]:
    """(endpoint, path, extra query) h5web sends to open the entry's default plot."""
    data = {"format": "bin", "dtype": "safe"}
    return [("meta", "/", {}), ("meta", "/1.1", {}), ("attr", "/1.1", {}),
            ("meta", "/1.1/plotselect", {}), ("attr", "/1.1/plotselect", {}),
            ("data", "/1.1/plotselect/data",
             {**data, **({"selection": signal_selection} if signal_selection else {})}),
            ("data", "/1.1/plotselect/x", data)]


def through_server(host: str, port: int, base: str, file: Path, requests) -> int:
    """h5web's requests on one connection; the bytes of the answers."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    sent = 0
    for endpoint, path, extra in requests:
        query = urllib.parse.urlencode({"file": str(file), "path": path, **extra})
        connection.request("GET", f"{base}h5grove/{endpoint}?{query}")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (endpoint, path, body[:200])
        sent += len(body)
    connection.close()
    return sent


def through_h5py(file: Path, requests) -> int:
    """The same metadata, attributes and slices with h5py; the bytes of the values."""
    read = 0
    with h5py.File(file, "r", locking=False) as f:
        for endpoint, path, extra in requests:
            item = f[path]
            if endpoint == "meta":
                if isinstance(item, h5py.Group):
                    for child in item.values():
                        dict(child.attrs)
                else:
                    item.shape, item.dtype, dict(item.attrs)
            elif endpoint == "attr":
                dict(item.attrs)
            else:
                selection = extra.get("selection")
                index = tuple(int(s) if ":" not in s else slice(None)
                              for s in selection.split(",")) if selection else ()
                read += np.asarray(item[index]).nbytes
    return read


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench/results/web.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scans = {f"{args.frames} frames 512x512 u16 bslz4": (root / "frames.h5", "0,:,:"),
                 f"{args.channels} ch x {args.points} scalars": (root / "scalars.h5", None)}
        t0 = time.perf_counter()
        write_frames_scan(root / "frames.h5", args.frames)
        write_scalars_scan(root / "scalars.h5", args.channels, args.points)
        print(f"files written in {time.perf_counter() - t0:.1f} s")
        server, url = start_serve([root])
        try:
            parsed = urllib.parse.urlparse(url)
            for name, (file, selection) in scans.items():
                requests = first_requests(selection)
                sent = through_server(parsed.hostname, parsed.port, parsed.path, file, requests)
                read = through_h5py(file, requests)
                served = best_of(args.repeats, lambda: through_server(
                    parsed.hostname, parsed.port, parsed.path, file, requests))
                bare = best_of(args.repeats, lambda: through_h5py(file, requests))
                rows.append({"scan": name, "requests": len(requests),
                             "server_ms": served * 1e3, "h5py_ms": bare * 1e3,
                             "added_ms": (served - bare) * 1e3, "bytes_sent": sent,
                             "bytes_read_h5py": read})
        finally:
            server.terminate()
            server.wait(20)
    print_table("h5web's first requests: blisswriter serve (real process, loopback) vs bare "
                "h5py, best of " + str(args.repeats), rows,
                ["scan", "requests", "server_ms", "h5py_ms", "added_ms", "bytes_sent",
                 "bytes_read_h5py"])
    write_json(args.json, "web", rows, vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
