"""A reader process for the SWMR stress tests (tests/test_swmr_readers.py).

    python tests/swmr_reader.py MODE REDIS_URL SCAN_KEY DURATION_S SEED

Reads random ranges of points the writer has published as durable, for DURATION_S seconds,
and checks every value against what the producer sends (`expected`). MODE:

- ``stream``: the Stream API, slices and single points (trimmed points come from the file);
- ``h5api``: ``blissdata.h5api.File`` on the scan's path;
- ``h5py``: h5py as the README says, ``h5py.File(path, "r", swmr=True)`` (HDF5's default
  locking), on the scan's path (the shared file);
- ``h5py-nolock``: the same with ``locking=False`` (sites that turn HDF5's locking off);
- ``silx``: ``silx.io.open(path)``, what ``silx view`` does (a plain open, then
  ``swmr=True`` if that raises OSError);
- any of the last three with ``@own``: on the scan's own file instead of the shared file.

Prints one JSON line {"mode", "reads", "points", "problems"}; exit status 1 if there was a
problem (a short read, a wrong value, an exception), 0 if not. A crash shows as a signal.
"""

from __future__ import annotations

import json
import random
import sys
import time

import numpy as np

FRAME_SHAPE = (128, 128)
STREAMS = {"cam:image": "cam", "diode:diode": "diode", "log:log": "log", "det:ref": "ref"}
JSON_STREAMS = {"log:log"}
REF_FRAME_SHAPE = (16, 16)
FRAMES_PER_FILE = 10  # the detector's own files (det:ref: references to their frames)


def mapping(names) -> list:
    """The scan's mapping: every stream of `names` under measurement."""
    return [{"NX_class": "NXentry"},
            {"measurement": [{"NX_class": "NXcollection"},
                             {STREAMS[n]: [{}, "STREAM", n] for n in names}]}]


MAPPING = mapping(["cam:image", "diode:diode", "log:log"])
MAX_RANGE = 48


def expected(stream: str, start: int, stop: int):
    """What the producer sends as points [start, stop) of `stream` (json: a list)."""
    if stream in JSON_STREAMS:  # texts of varying length
        return [{"i": i, "tag": "é" * (i % 17), "v": [i * 0.5] * (i % 5)}
                for i in range(start, stop)]
    index = np.arange(start, stop)
    if stream == "det:ref":  # the frames the references point to
        pixels = np.arange(np.prod(REF_FRAME_SHAPE)).reshape(REF_FRAME_SHAPE)
        return ((pixels[np.newaxis] + index[:, np.newaxis, np.newaxis] * 3) % 65536) \
            .astype(np.uint16)
    if stream == "diode:diode":
        return index * 0.5 + 1.0
    pixels = np.arange(FRAME_SHAPE[0] * FRAME_SHAPE[1]).reshape(FRAME_SHAPE)
    return ((pixels[np.newaxis] + index[:, np.newaxis, np.newaxis] * 7) % 65536) \
        .astype(np.uint16)


def _check(stream, start, stop, data, problems, how):
    want = expected(stream, start, stop)
    if stream in JSON_STREAMS:
        if data != want:
            got = f"{len(data)} points" if isinstance(data, list) else type(data).__name__
            problems.append(f"{how} {stream}[{start}:{stop}]: {got}, not the points sent")
        return
    data = np.asarray(data)
    if data.shape != want.shape:
        problems.append(f"{how} {stream}[{start}:{stop}]: shape {data.shape}, "
                        f"expected {want.shape}")
    elif not np.array_equal(data, want):
        bad = np.argwhere(data != want)[0]
        problems.append(f"{how} {stream}[{start}:{stop}]: wrong value at {tuple(bad)}")


def _random_range(durable: int):
    a = random.randrange(durable)
    return a, min(durable, a + random.randint(1, MAX_RANGE))


def _json_recipe(rows, start, stop) -> list:
    """Points [start, stop) of a json stream with plain h5py (docs/files.md): `rows`
    refreshed first, then the texts. Every row asked for must be there (durable)."""
    import json

    text = rows.file[rows.attrs["json_text"]]
    r = rows[start:stop]
    if text.shape[0] < r[-1, 1]:
        text.refresh()
    blob = text[r[0, 0]:r[-1, 1]].tobytes()
    return [json.loads(blob[a - r[0, 0]:b - r[0, 0]]) for a, b in r]


def _open(mode: str, scan):
    """The scan's file opened the way `mode` says (see the module's docstring)."""
    import hdf5plugin  # noqa: F401  (filters for compressed data, as the README says)

    opener, _, which = mode.partition("@")
    path = scan.path
    if which == "own":
        from pathlib import Path

        from writer.hdf5.shared_file import scan_file_in
        path = str(scan_file_in(Path(scan.path), f"{scan.number}.1"))
    return OPENERS[opener](path)


def _h5py(path, **how):
    import h5py
    return h5py.File(path, "r", **how)


def _silx(path):
    import silx.io
    return silx.io.open(path)


OPENERS = {"h5py": lambda p: _h5py(p, swmr=True),
           "h5py-nolock": lambda p: _h5py(p, swmr=True, locking=False),
           "silx": _silx}


def main(mode, url, scan_key, duration):
    from blissdata import DataStore

    store = DataStore(url)
    scan = store.load_scan(scan_key)
    problems, reads, points = [], 0, 0
    deadline = time.monotonic() + duration
    h5file = h5_dsets = None
    api = None
    names = [n for n in STREAMS if n in scan.streams]
    while time.monotonic() < deadline and len(problems) < 5:
        stream = random.choice(names)
        backing = scan.streams[stream].file_backing
        durable = backing["points"] if backing else 0
        if not durable:
            time.sleep(0.01)
            continue
        start, stop = _random_range(durable)
        try:
            if mode == "stream":
                s = scan.streams[stream]
                if random.random() < 0.5:
                    _check(stream, start, stop, s[start:stop], problems, "stream")
                else:
                    one = s[start]
                    _check(stream, start, start + 1, [one] if stream in JSON_STREAMS else
                           np.asarray(one)[np.newaxis], problems, "stream point")
                    stop = start + 1
            elif mode == "h5api":
                if api is None:
                    from blissdata.h5api import File
                    api = File(store, scan.path)
                # with the entry's name: another scan may have started in that file since
                path = f"/{scan.number}.1/measurement/{STREAMS[stream]}"
                _check(stream, start, stop, api[path][start:stop], problems, "h5api")
            elif mode.split("@")[0] in OPENERS:
                if h5file is None or random.random() < 0.02:  # sometimes open anew
                    if h5file is not None:
                        h5file.close()
                    h5file = _open(mode, scan)
                    entry = h5file[f"{scan.number}.1"]
                    h5_dsets = {name: entry[f"measurement/{STREAMS[name]}"]
                                for name in names if name != "det:ref"}
                if stream == "det:ref":  # docs/files.md: its own file, replaced whole:
                    dset = h5file[f"{scan.number}.1/measurement/ref"]  # get it again
                else:
                    dset = h5_dsets[stream]
                    dset.refresh()
                stop = min(stop, dset.shape[0])
                if stop <= start:
                    continue
                if stream in JSON_STREAMS:  # docs/files.md: the rows, then their texts
                    _check(stream, start, stop, _json_recipe(dset, start, stop), problems,
                           "h5py")
                else:
                    _check(stream, start, stop, dset[start:stop], problems, "h5py")
            else:
                raise SystemExit(f"unknown mode {mode!r}")
        except Exception as exc:  # noqa: BLE001  (any exception is a problem to report)
            problems.append(f"{mode} {stream}[{start}:{stop}]: {type(exc).__name__}: {exc}")
            continue
        reads += 1
        points += stop - start
    print(json.dumps({"mode": mode, "reads": reads, "points": points, "problems": problems}),
          flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    mode, url, key, duration, seed = sys.argv[1:6]
    random.seed(int(seed))
    sys.exit(main(mode, url, key, float(duration)))
