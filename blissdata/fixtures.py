"""Realistic scans to publish (tests, the demo, benchmarks): fixtures/*.json + data recipes.

A fixture is a scan header (info with channels, devices, chain, mapping) plus, per stream, a
recipe that gives point i deterministically, so what a file holds can be compared with what
was published. See fixtures/README.md for the format and the recipe kinds.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import h5py
import numpy as np

from . import EndReason
from .interrupt import end_interrupted

FIXTURES_DIR = Path(__file__).resolve().parent.parent / "fixtures"
RECIPES = ("linear", "grid_fast", "grid_slow", "gaussian", "gaussian2d", "counter",
           "elapsed_time", "epoch", "constant", "frame", "frame_sum", "spectrum",
           "varying_spectrum", "external_frame")
EPOCH0 = 1.7e9


class FixtureError(ValueError):
    """A fixture that is missing or malformed; the message names the file and the problem."""


def list_fixtures() -> list[str]:
    return sorted(p.stem for p in FIXTURES_DIR.glob("*.json"))


def load_fixture(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = FIXTURES_DIR / f"{name_or_path}.json"
    try:
        fixture = json.loads(path.read_text())
    except FileNotFoundError:
        raise FixtureError(f"fixture {name_or_path!r}: no file {path} (known fixtures: "
                           f"{', '.join(list_fixtures())})") from None
    except json.JSONDecodeError as exc:
        raise FixtureError(f"fixture {path}: not valid JSON: {exc}") from None
    if not isinstance(fixture, dict):
        raise FixtureError(f"fixture {path}: the top level must be an object")
    for key in ("info", "streams"):
        if key not in fixture:
            raise FixtureError(f"fixture {path}: missing key {key!r}")
    for i, s in enumerate(fixture["streams"]):
        if not isinstance(s, dict) or "name" not in s or "recipe" not in s:
            raise FixtureError(f"fixture {path}: streams[{i}] needs 'name' and 'recipe'")
        kind = s["recipe"].get("kind")
        if kind not in RECIPES:
            raise FixtureError(f"fixture {path}: stream {s['name']!r}: unknown recipe kind "
                               f"{kind!r} (known: {', '.join(RECIPES)})")
    fixture.setdefault("identity", {}).setdefault("name", path.stem)
    fixture["source"] = str(path)
    return fixture


# ---- data -------------------------------------------------------------------------------

def _smooth_pattern(shape, seed):
    y, x = np.mgrid[: shape[0], : shape[1]]
    return 20 + 15 * np.sin(x / 37.0 + seed) ** 2 + 10 * np.cos(y / 23.0) ** 2


def _linear(r, i, n):
    return r["start"] + (r["stop"] - r["start"]) * (i / max(n - 1, 1))


def generate(fixture: dict, npoints: int | None = None, rate: float | None = None) -> dict:
    """{stream name: all its points} for `npoints` points (default: the fixture's own):
    an array for numeric streams, a list for varying-shape and reference streams. `rate`:
    points per second of the publication (the time streams follow it)."""
    source = PointSource(fixture, npoints, rate)
    return source.points(0, source.npoints)


# Recipes whose points are large (frames, spectra) or made one by one: PointSource makes them
# batch by batch. The others (scalars, some drawn from one random sequence) are made whole.
PER_BATCH = ("frame", "frame_sum", "spectrum", "varying_spectrum", "external_frame")


class PointSource:
    """The points of every stream of a fixture, [start, stop) at a time: publishing a long
    scan of frames holds one batch of them in memory, not the scan (point i is the same
    whatever the batches)."""

    def __init__(self, fixture: dict, npoints: int | None = None, rate: float | None = None):
        self.npoints = int(npoints or fixture["info"].get("npoints", 1))
        self._streams = fixture["streams"]
        # the time between points: the header's count_time, or the pace it is published at
        self._count_time = 1.0 / rate if rate else fixture["info"].get("count_time", 0.1)
        self._whole: dict = {}
        everything = np.arange(self.npoints)
        for s in self._streams:  # recipes may use streams defined before them
            if s["recipe"]["kind"] not in PER_BATCH:
                self._whole[s["name"]] = _generate_stream(s, everything, self.npoints,
                                                          self._whole, self._count_time)

    def points(self, start: int, stop: int) -> dict:
        """{stream name: points [start, stop)}."""
        out: dict = {}
        for s in self._streams:
            name = s["name"]
            if name in self._whole:
                out[name] = self._whole[name][start:stop]
            else:
                out[name] = _generate_stream(s, np.arange(start, stop), self.npoints, out,
                                             self._count_time)
        return out


def _generate_stream(s, i, n, done, count_time):
    """Points `i` (an index array) of stream `s` in a scan of `n` points; `done`: the same
    points of the streams defined before it."""
    r, kind = s["recipe"], s["recipe"]["kind"]
    if kind == "linear":
        values = _linear(r, i, n)
    elif kind == "grid_fast":
        values = r["start"] + (r["stop"] - r["start"]) * ((i % r["nx"]) / max(r["nx"] - 1, 1))
    elif kind == "grid_slow":
        values = r["start"] + (r["stop"] - r["start"]) * ((i // r["nx"]) / max(r["ny"] - 1, 1))
    elif kind == "gaussian":
        x = np.asarray(done[r["axis"]], dtype=float)
        clean = r["background"] + r["amplitude"] * np.exp(-0.5 * ((x - r["center"]) / r["width"]) ** 2)
        values = np.random.default_rng(r["seed"]).poisson(clean).astype(float)
    elif kind == "gaussian2d":
        x, y = np.asarray(done[r["x"]]), np.asarray(done[r["y"]])
        d2 = ((x - r["cx"]) ** 2 + (y - r["cy"]) ** 2) / r["width"] ** 2
        values = np.random.default_rng(r["seed"]).poisson(
            r["background"] + r["amplitude"] * np.exp(-0.5 * d2)).astype(float)
    elif kind == "counter":
        values = np.random.default_rng(r["seed"]).poisson(r["level"], n).astype(float)[i]
    elif kind == "elapsed_time":
        values = i * count_time
    elif kind == "epoch":
        values = EPOCH0 + i * count_time
    elif kind == "constant":
        values = np.full(len(i), r["value"], dtype=float)
    elif kind == "frame":
        shape = tuple(s["shape"])
        base = _smooth_pattern(shape, r["seed"])
        return np.stack([np.random.default_rng(r["seed"] * 100003 + k).poisson(base)
                         .astype(s["dtype"]) for k in i]) if len(i) else \
            np.empty((0, *shape), s["dtype"])
    elif kind == "frame_sum":
        frames = done[r["frames"]]
        values = frames.reshape(len(frames), -1).sum(axis=1).astype(float)
    elif kind == "spectrum":
        channels = np.arange(s["shape"][0])
        out = np.empty((len(i), s["shape"][0]), s["dtype"])
        for row, k in enumerate(i):
            peaks = sum(a * np.exp(-0.5 * ((channels - c) / 12.0) ** 2)
                        for a, c in ((800 + 40 * k, 1200), (300, 2100 + k), (150, 3300)))
            out[row] = np.random.default_rng(r["seed"] * 7919 + k).poisson(peaks + 5)
        return out
    elif kind == "varying_spectrum":
        return [np.random.default_rng(r["seed"] + k).random(3 + (k * 7) % 11)
                .astype(s["dtype"]) for k in i]
    elif kind == "external_frame":
        return [{"file": _external_file(r, k), "dataset": "/entry_0000/data",
                 "index": int(k) % r["frames_per_file"]} for k in i]
    else:  # load_fixture checked the kinds
        raise FixtureError(f"stream {s['name']!r}: unknown recipe kind {kind!r}")
    return np.asarray(values, dtype=s.get("dtype", "float64"))


def _external_file(recipe, k) -> str:
    """Where the simulated detector stores frame k (relative to the scan file's folder)."""
    return f"eiger_{k // recipe['frames_per_file']:04d}.h5"


def external_frame(recipe, k) -> np.ndarray:
    shape = tuple(recipe["shape"])
    return np.random.default_rng(recipe["seed"] * 1009 + k).poisson(
        _smooth_pattern(shape, recipe["seed"])).astype(recipe["dtype"])


def _write_external(recipe, k, scan_file: Path) -> None:
    """Act as the detector: store frame k in its own file before announcing it."""
    path = scan_file.parent / _external_file(recipe, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(recipe["shape"])
    with h5py.File(path, "a") as f:
        if "entry_0000" not in f:  # a NeXus file with a default plot, as Lima writes them
            d = f.create_dataset("/entry_0000/data", shape=(recipe["frames_per_file"], *shape),
                                 dtype=recipe["dtype"])
            f.attrs.update({"NX_class": "NXroot", "default": "entry_0000"})
            f["entry_0000"].attrs.update({"NX_class": "NXentry", "default": "plot"})
            plot = f.create_group("entry_0000/plot")
            plot.attrs.update({"NX_class": "NXdata", "signal": "data",
                               "interpretation": "image", "axes": ["frame", "y", "x"]})
            plot["data"] = d  # the same dataset, a second name
            for axis, size in zip(("frame", "y", "x"), d.shape):  # indices: no "." axes,
                plot[axis] = np.arange(size, dtype=float)         # which punx refuses
                if axis != "frame":
                    plot[axis].attrs["units"] = "pixel"
        d = f["/entry_0000/data"]
        d[k % recipe["frames_per_file"]] = external_frame(recipe, k)


# ---- publishing ---------------------------------------------------------------------------

def publish(store, fixture, session: str, path: str, npoints: int | None = None,
            rate: float | None = None, progress=None, number: int = 1,
            batch: int | None = None) -> list:
    """Publish `fixture` as the acquisition software would, through the public API.

    Returns the published scans (a sequence: the parent first, then its subscans).
    `rate`: points per second (None: as fast as possible); `progress(done, total)`.
    """
    if isinstance(fixture, str):
        fixture = load_fixture(fixture)
    check_detector_files(fixture, path, npoints)
    sub = fixture.get("subscans")
    if sub:
        return _publish_sequence(store, fixture, session, path, npoints, rate, progress,
                                 number)
    scan = _create(store, fixture, session, path, number, npoints)
    try:
        _run(scan, fixture, Path(path), npoints, rate, progress, batch)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (blissdata.interrupt)
        end_interrupted(scan, exc)
        raise
    return [scan]


def check_detector_files(fixture, path, npoints: int | None = None) -> None:
    """FixtureError if the simulated detector's files of this scan (beside `path`) exist:
    they may be the frames an earlier scan's virtual dataset points to, never overwritten."""
    fixtures = [fixture]
    if fixture.get("subscans"):
        fixtures.append(load_fixture(fixture["subscans"]["fixture"]))
    folder = Path(path).parent
    for one in fixtures:
        n = int(npoints or one["info"].get("npoints", 1))
        for s in one["streams"]:
            if s["recipe"]["kind"] != "external_frame":
                continue
            names = sorted({_external_file(s["recipe"], k) for k in range(n)})
            there = [name for name in names if (folder / name).exists()]
            if there:
                raise FixtureError(
                    f"fixture {one['identity']['name']!r}: the simulated detector's files "
                    f"{', '.join(there[:3])} already exist in {folder} (an earlier scan's "
                    f"frames, which its file points to); not overwritten: give a --path "
                    f"in another folder")


def _create(store, fixture, session, path, number, npoints, extra_info=None):
    info = copy.deepcopy(fixture["info"])
    info["scan_nb"] = number
    if npoints:
        info["npoints"] = int(npoints)
    info.update(extra_info or {})
    if info.get("grid_shape") and npoints and int(npoints) != int(np.prod(info["grid_shape"])):
        info.pop("grid_shape")  # a different number of points is no longer that grid
    scan = store.create_scan({"session": session, "name": fixture["identity"]["name"],
                              "number": number, "path": str(path)}, info=info)
    for s in fixture["streams"]:
        shape = s.get("shape", [])
        scan.create_stream(s["name"], dtype=s.get("dtype"), shape=tuple(shape),
                           encoding=s.get("encoding", "numeric"), info={"recipe": s["recipe"]})
    return scan


def _run(scan, fixture, path: Path, npoints, rate, progress, batch=None):
    source = PointSource(fixture, npoints, rate)  # frames are made batch by batch, as sent
    n = source.npoints
    stop_at = fixture.get("stop_at")
    last = n if stop_at is None else max(1, int(n * stop_at))
    streams = scan.streams
    scan.prepare()
    scan.start()
    big = any(s.get("shape") and np.prod(s["shape"]) > 10000 for s in fixture["streams"])
    step = batch or (1 if rate else (4 if big else 100))
    t0 = time.monotonic()
    for start in range(0, last, step):
        stop = min(start + step, last)
        if rate:
            delay = t0 + start / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        batches = {}
        data = source.points(start, stop)
        for s in fixture["streams"]:
            points = data[s["name"]]
            if s["recipe"]["kind"] == "external_frame":
                for k in range(start, stop):
                    _write_external(s["recipe"], k, path)
            batches[streams[s["name"]]] = points
        scan.send_many(batches)
        if progress:
            progress(stop, n)
    scan.stop()
    scan.close(EndReason(fixture.get("end_reason", "SUCCESS")))


def _publish_sequence(store, fixture, session, path, npoints, rate, progress, number):
    sub = fixture["subscans"]
    child_fixture = load_fixture(sub["fixture"])
    parent = _create(store, fixture, session, path, number, None)
    n_children = int(sub["count"])
    parent_data = generate(fixture, n_children)
    parent.prepare()
    parent.start()
    scans = [parent]
    try:
        for k in range(n_children):
            child = _create(store, child_fixture, session, path, number + 1 + k,
                            npoints or sub.get("npoints"), extra_info={"group": parent.key})
            scans.append(child)
            _run(child, child_fixture, Path(path), npoints or sub.get("npoints"), rate, None)
            parent.send_many({parent.streams[name]: values[k] for name, values in
                              parent_data.items()})
            if progress:
                progress(k + 1, n_children)
    except KeyboardInterrupt as exc:  # the subscan being published, then the sequence
        for scan in reversed(scans):
            end_interrupted(scan, exc)
        raise
    parent.stop()
    parent.close(EndReason.SUCCESS)
    return scans
