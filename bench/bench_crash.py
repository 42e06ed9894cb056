"""Crash safety: a writer killed -9 at random moments while it appends, then restarted.

    python bench/bench_crash.py [--kills 12] [--json bench/results/crash.json]

After each kill, before the restart, the scan's file is checked as a reader finds it: does it
open read-only (``swmr=True``, which works for any file), and does it hold every point the
writer had published as durable, with the right values? Then the writer is restarted and
resumes. At the end: every point once in the file. Each kill comes 0.2-1.5 s after the
(re)start, while a producer sends 64x64 uint16 frames and scalars at ~400 points/s.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

from blissdata import DataStore  # noqa: E402
from blissdata.redis_server import EmbeddedRedis  # noqa: E402

SHAPE = (64, 64)


def frame(i: int) -> np.ndarray:
    return ((np.arange(SHAPE[0] * SHAPE[1]) + 7 * i) % 65536).astype(np.uint16).reshape(SHAPE)


def start_writer(url: str, root: Path, log) -> subprocess.Popen:
    # max_lag_s 0.2: the writer flushes 0.1 s after data came (at 1 s, the default, a flush
    # is due 0.5 s after the first data: later than most kills, so little to check)
    config = root / "writer.toml"
    config.write_text(f'data_roots = ["{root}"]\nmax_lag_s = 0.2\n')
    return subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--redis", url,
                             "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)


def check_file(path: str, datasets: dict, durable: dict) -> tuple[bool, bool, str]:
    """(opens read-only with swmr=True, every durable point right, what went wrong)."""
    try:
        f = h5py.File(path, "r", swmr=True, locking=False)
    except Exception as exc:  # noqa: BLE001
        return False, False, f"open: {exc}"
    try:
        for name, points in durable.items():
            d = f[datasets[name]]
            if name == "diode":
                ok = np.array_equal(d[:points], np.arange(points) * 0.5)
            else:
                ok = all(np.array_equal(d[i], frame(i)) for i in range(points))
            if not ok:
                return True, False, f"{name}: wrong values below {points}"
        return True, True, ""
    except Exception as exc:  # noqa: BLE001
        return True, False, f"read: {exc}"
    finally:
        f.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default="bench/results/crash.json")
    args = parser.parse_args(argv)
    random.seed(args.seed)
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = DataStore(server.url)
        log = open(root / "writer.log", "ab")
        writer = start_writer(server.url, root, log)
        time.sleep(1.0)
        scan = store.create_scan({"session": "crash", "name": "timescan", "number": 1,
                                  "path": str(root / "crash.h5")},
                                 info={"title": "crash", "type": "timescan", "scan_nb": 1})
        cam = scan.create_stream("cam", "uint16", SHAPE)
        diode = scan.create_stream("diode", "float64")
        scan.prepare()
        scan.start()
        stop, sent = threading.Event(), [0]

        def produce():
            while not stop.is_set():
                i = sent[0]
                scan.send_many({cam: np.stack([frame(k) for k in range(i, i + 4)]),
                                diode: np.arange(i, i + 4) * 0.5})
                sent[0] += 4
                time.sleep(0.01)

        producer = threading.Thread(target=produce)
        producer.start()
        results = []
        for _ in range(args.kills):
            time.sleep(random.uniform(0.2, 1.5))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            backing = {s.name: s.file_backing for s in (cam, diode)}
            if None in backing.values():
                results.append({"opens": None, "intact": None, "why": "nothing durable yet"})
            else:
                durable = {n: b["points"] for n, b in backing.items()}
                opens, intact, why = check_file(backing["cam"]["file"],
                                                {n: b["dataset"] for n, b in backing.items()},
                                                durable)
                results.append({"opens": opens, "intact": intact, "why": why,
                                "durable": durable})
            writer = start_writer(server.url, root, log)
        stop.set()
        producer.join()
        scan.stop()
        scan.close()
        deadline = time.monotonic() + 60
        while (diode.file_backing or {}).get("points", 0) < sent[0] and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        writer.send_signal(signal.SIGTERM)
        writer.wait(30)
        final_ok = False
        backing = diode.file_backing
        if backing:
            with h5py.File(backing["file"], "r", swmr=True) as f:
                d = f[backing["dataset"]]
                final_ok = d.shape[0] == sent[0] and np.array_equal(d[:], np.arange(sent[0]) * 0.5)
        store.close()
    checked = [r for r in results if r["opens"] is not None]
    rows = [{"what": "kills -9 (file checked after)", "count": len(checked),
             "of": len(results)},
            {"what": "file opens read-only (swmr=True) after the kill",
             "count": sum(r["opens"] for r in checked), "of": len(checked)},
            {"what": "every point published durable there, right values",
             "count": sum(r["intact"] for r in checked), "of": len(checked)},
            {"what": "resumed: every point once at the end", "count": int(final_ok), "of": 1}]
    print_table("Writer killed -9 while appending", rows, ["what", "count", "of"])
    for r in checked:
        if r["why"]:
            print("  ", r["why"])
    write_json(args.json, "crash", rows, {"kills": args.kills, "seed": args.seed,
                                          "points": sent[0],
                                          "problems": [r["why"] for r in checked if r["why"]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
