"""json points read by SWMR readers while a writer appends them: variable-length strings (the
layout before, and blisswriter 3's) against the writer's texts beside their rows
(writer/hdf5/json_appender.py, docs/files.md item 4).

    python bench/bench_swmr_json.py [--seconds 8] [--readers 3] [--json bench/results/swmr_json.json]

For each layout and pace (full speed; 200 points/s), one writer process appends batches of
10 JSON points to a file in SWMR mode (``libver="latest"``) and flushes after each batch;
reader processes open the file with ``swmr=True, locking=False`` and, in a loop, refresh,
read the last 50 points and check every value. Reported per layout: reads, failed reads (an
exception), wrong values, and the readers' exit codes (a crash shows as a signal). The
baseline is the variable-length strings measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

BATCH = 10
LAST = 50


def point(i: int):
    return {"i": i, "name": f"pt{i}", "values": list(range(i % 7)), "text": "é" * (i % 5)}


def write(path: str, layout: str, seconds: float, pause: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blissdata.json_points import text_dataset  # noqa: F401  (the project importable)
    from writer.hdf5.json_appender import JsonAppender
    from writer.hdf5.text_appender import TextAppender

    with h5py.File(path, "w", libver="latest") as f:
        if layout == "strings":
            appender = TextAppender(f, "log")
        else:
            appender = JsonAppender(f, "log", compression="none", workers=0)
        f.swmr_mode = True
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            appender.append([point(i) for i in range(n, n + BATCH)])
            appender.flush()
            f.flush()
            n += BATCH
            if pause:
                time.sleep(pause)
    print(json.dumps({"points": n}))


def read(path: str, seconds: float) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from blissdata.json_points import is_text_index, json_points, text_dataset

    deadline = time.monotonic() + 10
    while True:
        try:
            f = h5py.File(path, "r", swmr=True, locking=False)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    rows = f["log"]
    text = text_dataset(rows) if is_text_index(rows) else None
    reads = failed = wrong = 0
    first_error = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            rows.refresh()  # the rows first, then the texts (docs/files.md)
            if text is not None:
                text.refresh()
            n = rows.shape[0]
            if not n:
                continue
            lo = max(0, n - LAST)
            values = json_points(rows, lo, rows[lo:n])
            wrong += sum(v != point(lo + k) for k, v in enumerate(values))
            reads += 1
        except Exception as exc:  # noqa: BLE001  (what a reader meets)
            failed += 1
            first_error = first_error or f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    print(json.dumps({"reads": reads, "failed": failed, "wrong": wrong,
                      "first_error": first_error}))


def run(layout: str, seconds: float, readers: int, pause: float, folder: Path) -> dict:
    path = folder / f"{layout}_{pause}.h5"
    me = [sys.executable, __file__]
    writer = subprocess.Popen(me + ["write", str(path), layout, str(seconds + 1), str(pause)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    procs = [subprocess.Popen(me + ["read", str(path), str(seconds)], stdout=subprocess.PIPE,
                              text=True) for _ in range(readers)]
    reports, codes = [], []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        codes.append(p.returncode)
        if p.returncode == 0:
            reports.append(json.loads(out.strip().splitlines()[-1]))
    out, _ = writer.communicate(timeout=seconds + 60)
    total = lambda key: sum(r[key] for r in reports)  # noqa: E731
    attempts = total("reads") + total("failed")
    return {"layout": layout, "pace": "full speed" if not pause else f"{BATCH / pause:g} pts/s",
            "points written": json.loads(out)["points"], "reads": total("reads"),
            "failed reads": total("failed"), "failed fraction": total("failed") / max(1, attempts),
            "wrong values": total("wrong"), "reader exit codes": codes,
            "first error": next((r["first_error"] for r in reports if r["first_error"]), "")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "swmr_json.json"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pause in (0.0, BATCH / 200):
            for layout in ("strings", "texts and rows"):
                rows.append(run(layout, args.seconds, args.readers, pause, Path(tmp)))
    for row in rows:  # readable reads, as a ratio of the baseline's
        base = next(r for r in rows if r["pace"] == row["pace"] and r["layout"] == "strings")
        row["readable reads vs strings"] = row["reads"] / max(1, base["reads"])
    columns = ["layout", "pace", "points written", "reads", "failed reads", "failed fraction",
               "wrong values", "readable reads vs strings", "reader exit codes", "first error"]
    print_table("json points read by SWMR readers while appended", rows, columns)
    write_json(args.json, "swmr_json", rows, vars(args))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"]:
        write(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    elif sys.argv[1:2] == ["read"]:
        read(sys.argv[2], float(sys.argv[3]))
    else:
        sys.exit(main())
