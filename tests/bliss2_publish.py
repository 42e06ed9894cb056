"""Publish scans with the REAL blissdata 2.x (run by the reference venv's python, never
imported by the project): the producer side of tests/test_blissdata2.py and
bench/bench_bliss2.py.

    python bliss2_publish.py REDIS_URL init
    python bliss2_publish.py REDIS_URL SCENARIO FILE_PATH NUMBER [key=value ...]

Prints the scan key on stdout. Scenarios: scalars, frames, aborted, links, varying,
fallback, lima, lima_nosave, lima_edf, lima2, nomap, badnode, bench_frames, bench_counters,
bench_scalars.
"""

import base64
import os
import sys
import time

import numpy as np
from blissdata.h5map import (ExternalLink, Group, Inline, InlineBase64, Dataset, SoftLink,
                             Stream as StreamItem)
from blissdata.redis_engine.store import DataStore
from blissdata.streams.default import Stream
from blissdata.streams.hdf5_fallback import Hdf5BackedStream


def entry_group(number, title, children, end=False):
    kids = {"title": title, "start_time": "2026-11-29T12:00:00+00:00", **children}
    if end:
        kids["end_time"] = "2026-11-29T12:00:05+00:00"
    return Group(attributes={"NX_class": "NXentry", "default": "plotselect"}, children=kids)


def publish(store, file_path, number, streams, entry_children, batches, *, end_reason="SUCCESS",
            stop_after=None, h5maps=True, extra_final=None, pace=0.0, info_extra=None,
            raw_children=None, master=None):
    identity = {"name": "test", "number": number, "data_policy": "no_policy",
                "session": "bliss2test", "path": file_path}
    info = {"title": f"scan {number}", "type": "ascan", "save": True, "npoints": None,
            **(info_extra or {})}
    scan = store.create_scan(identity, info)
    handles = {name: scan.create_stream(defn) for name, defn in streams.items()}
    root = Group(attributes={"NX_class": "NXroot", "creator": "bliss2_publish"},
                 children={f"{number}.1": entry_group(number, f"scan {number}", entry_children)})
    def dump(group):
        # model_dump(mode="json") fails on InlineRaw with this pydantic; python mode keeps
        # bytes (inline_b64), which the scan's JSON encoder refuses: those go in as JSON
        raw = group.model_dump()
        raw["children"][f"{number}.1"]["children"].update(raw_children or {})
        return raw

    def master_map(final):
        # a master file: an external link to the scan's entry (and, at the end, its title)
        children = {f"{number}.1": ExternalLink(target_file=os.path.basename(file_path),
                                                target_path=f"/{number}.1")}
        if final:
            children[f"{number}.1_title"] = Dataset(attributes={"scan": number},
                                                    value=f"scan {number}")
        return Group(attributes={"NX_class": "NXroot"}, children=children).model_dump()

    if h5maps:
        scan.info["h5maps"] = {file_path: dump(root)}
        if master:
            scan.info["h5maps"][master] = master_map(False)
    scan.prepare()
    scan.start()
    for i, batch in enumerate(batches):
        if stop_after is not None and i >= stop_after:
            break
        for name, data in batch.items():
            handles[name].send(data)
        if pace:
            time.sleep(pace)
    scan.stop()
    scan.info["end_reason"] = end_reason
    if h5maps:
        final = root.model_copy(deep=True)
        entry = final.children[f"{number}.1"]
        entry.children["end_time"] = Dataset(value="2026-11-29T12:00:05+00:00")
        if extra_final:
            entry.children.update(extra_final)
        scan.info["h5maps"] = {file_path: dump(final)}
        if master:
            scan.info["h5maps"][master] = master_map(True)
    scan.close()
    return scan.key


def scalar_scan(store, file_path, number, npoints=50, batch=10, **kw):
    streams = {
        "axis:sy": Stream.make_definition("axis:sy", "float64"),
        "diode:diode": Stream.make_definition("diode:diode", "float64"),
        "timer:epoch": Stream.make_definition("timer:epoch", "float64"),
        "ct:counts": Stream.make_definition("ct:counts", "int32"),
    }
    children = {
        "instrument": Group(attributes={"NX_class": "NXinstrument"}, children={
            "sy": Group(attributes={"NX_class": "NXpositioner"}, children={
                "value": Dataset(attributes={"units": "mm"}, value=StreamItem(stream="axis:sy")),
                "name": "sy",
            }),
            "diode": Group(attributes={"NX_class": "NXdetector"}, children={
                "data": StreamItem(stream="diode:diode"),
                "gain": Inline(dtype="int8", value=3),
            }),
        }),
        "measurement": Group(attributes={"NX_class": "NXcollection"}, children={
            "sy": SoftLink(target_path=f"/{number}.1/instrument/sy/value"),
            "diode": SoftLink(target_path=f"/{number}.1/instrument/diode/data"),
            "epoch": StreamItem(stream="timer:epoch"),
            "counts": StreamItem(stream="ct:counts"),
        }),
        "plotselect": Group(attributes={"NX_class": "NXdata", "signal": "diode",
                                        "axes": ["sy"]}, children={
            "diode": SoftLink(target_path=f"/{number}.1/instrument/diode/data"),
            "sy": SoftLink(target_path=f"/{number}.1/instrument/sy/value"),
        }),
    }
    x = np.linspace(0, 1, npoints)
    batches = [{"axis:sy": x[i:i + batch], "diode:diode": np.sin(x[i:i + batch]) * 1e3,
                "timer:epoch": 1.7e9 + x[i:i + batch],
                "ct:counts": np.arange(i, min(i + batch, npoints), dtype=np.int32)}
               for i in range(0, npoints, batch)]
    return publish(store, file_path, number, streams, children, batches, **kw)


def camera_children(number):
    """The h5map children of a camera scan: its frames under instrument/cam/data, linked from
    measurement/cam beside the epoch timer."""
    return {
        "instrument": Group(attributes={"NX_class": "NXinstrument"}, children={
            "cam": Group(attributes={"NX_class": "NXdetector"}, children={
                "data": Dataset(attributes={"interpretation": "image"},
                                value=StreamItem(stream="cam:image")),
            })}),
        "measurement": Group(attributes={"NX_class": "NXcollection"}, children={
            "cam": SoftLink(target_path=f"/{number}.1/instrument/cam/data"),
            "epoch": StreamItem(stream="timer:epoch")}),
    }


def frame_scan(store, file_path, number, npoints=12, shape=(64, 48), dtype="uint16", batch=1,
               pace=0.0, **kw):
    streams = {"cam:image": Stream.make_definition("cam:image", dtype, shape),
               "timer:epoch": Stream.make_definition("timer:epoch", "float64")}
    children = camera_children(number)
    rng = np.random.default_rng(number)
    frame = rng.integers(0, 1000, size=(batch, *shape)).astype(dtype)

    def batches():
        for i in range(0, npoints, batch):
            n = min(batch, npoints - i)
            frames = frame[:n].copy()
            frames[:, 0, 0] = np.arange(i, i + n)  # each frame its own
            yield {"cam:image": frames, "timer:epoch": 1.7e9 + np.arange(i, i + n) * 0.1}

    return publish(store, file_path, number, streams, children, batches(), pace=pace, **kw)


def links_scan(store, file_path, number, **kw):
    streams = {"diode:diode": Stream.make_definition("diode:diode", "float32")}
    b64 = np.arange(6, dtype="<u2").reshape(2, 3)
    children = {
        "sample": Group(attributes={"NX_class": "NXsample"}, children={
            "name": "lysozyme",
            "temperature": Dataset(attributes={"units": "K"}, value=291.5),
            "ub_matrix": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            "flags": [True, False, True],
            "labels": ["a", "bb", "ccc"],
            "counts": Inline(dtype="uint32", value=[1, 2, 3]),
            "nan_value": Inline(dtype="float32", value="nan"),
        }),
        "measurement": Group(attributes={"NX_class": "NXcollection"}, children={
            "diode": StreamItem(stream="diode:diode")}),
        "sample_link": SoftLink(target_path=f"/{number}.1/sample"),
        "elsewhere": ExternalLink(target_file="other.h5", target_path="/1.1/measurement"),
    }
    batches = [{"diode:diode": np.arange(i, i + 5, dtype=np.float32)} for i in range(0, 20, 5)]
    # Base64Bytes takes the base64 text (and decodes it)
    raw_bytes = InlineBase64(dtype="<u2", shape=[2, 3], value=base64.b64encode(b64.tobytes()))
    return publish(store, file_path, number, streams, children, batches,
                   raw_children={"raw_bytes": raw_bytes.model_dump(mode="json")}, **kw)


def varying_scan(store, file_path, number, **kw):
    streams = {"mca:spectrum": Stream.make_definition("mca:spectrum", "float64", (-1,)),
               "mca:counts": Stream.make_definition("mca:counts", "int16", (-1,))}
    children = {"measurement": Group(attributes={"NX_class": "NXcollection"}, children={
        "spectrum": StreamItem(stream="mca:spectrum"),
        "counts": StreamItem(stream="mca:counts")})}
    batches = [{"mca:spectrum": np.arange(n, dtype=float)[None, :] + i,
                "mca:counts": np.arange(n, dtype=np.int16)[None, :]}
               for i, n in enumerate([4, 6, 6, 3, 8])]
    return publish(store, file_path, number, streams, children, batches, **kw)


def fallback_scan(store, file_path, number, npoints=40, **kw):
    """A stream declared file-backed (hdf5_fallback plugin), as BLISS does for saved data."""
    data_path = f"/{number}.1/measurement/diode"
    streams = {"diode:diode": Hdf5BackedStream.make_definition(
        "diode:diode", file_path, data_path, "float64")}
    children = {"measurement": Group(attributes={"NX_class": "NXcollection"}, children={
        "diode": StreamItem(stream="diode:diode")})}
    batches = [{"diode:diode": np.arange(i, i + 10, dtype=float)} for i in range(0, npoints, 10)]
    return publish(store, file_path, number, streams, children, batches, **kw)


def lima_scan(store, file_path, number, npoints=12, per_file=5, shape=(32, 24),
              file_format="HDF5BS", saving=True, pace=0.0, lima_dir=None, **kw):
    """A Lima detector (the lima plugin, lima_v1): the stream carries statuses
    {last_index, last_index_saved}; the frames are in the detector's own HDF5 files, written
    here with h5py in the layout the stream declares (`per_file` frames a file)."""
    import h5py
    from blissdata.streams.lima import LimaStream

    stem = os.path.splitext(os.path.basename(file_path))[0]
    folder = os.path.join(lima_dir or os.path.dirname(file_path), f"{stem}_lima")
    files = {"file_path": os.path.join(folder, "cam_%04d.h5"),
             "data_path": "/entry_0000/measurement/data", "file_format": file_format,
             "file_offset": 0, "frames_per_file": per_file}
    streams = {"cam:image": LimaStream.make_definition(
        "cam:image", "uint16", list(shape), server_url="id00/limaccds/cam",
        buffer_max_number=4, frames_per_acquisition=npoints, acquisition_offset=0,
        saving=files if saving else {}),
        "timer:epoch": Stream.make_definition("timer:epoch", "float64")}
    children = camera_children(number)
    rng = np.random.default_rng(number)
    frames = rng.integers(0, 1000, size=(npoints, *shape)).astype(np.uint16)
    frames[:, 0, 0] = np.arange(npoints)
    if saving:  # what the Lima server writes
        os.makedirs(os.path.dirname(files["file_path"]), exist_ok=True)
        for k in range(0, npoints, per_file):
            with h5py.File(files["file_path"] % (k // per_file), "w") as f:
                f[files["data_path"]] = frames[k:k + per_file]

    def batches():
        for i in range(0, npoints, 3):  # a status every 3 frames, as Lima's polling does
            last = min(i + 2, npoints - 1)
            yield {"cam:image": {"last_index": last, "last_index_saved": last},
                   "timer:epoch": 1.7e9 + np.arange(i, last + 1) * 0.1}

    return publish(store, file_path, number, streams, children, batches(), pace=pace, **kw)


def no_lima2_conductor():
    """blissdata_lima2's stream greets the detector's conductor (a Lima2 server) when it is
    made: there is none here, the frames are in files written by the test."""
    import lima2.client.services as l2s

    class Offline:
        def handshake(self):
            pass

    l2s.init = lambda **kw: Offline()


def lima2_scan(store, file_path, number, npoints=12, shape=(32, 24), saved=True, **kw):
    """A Lima2 detector (plugin lima2): the stream carries the count of frames the detector
    holds (uint32); its frames are in its own files behind a master file, written here."""
    import h5py
    from blissdata_lima2 import Lima2Stream

    no_lima2_conductor()
    stem = os.path.splitext(os.path.basename(file_path))[0]
    master_file = os.path.join(os.path.dirname(file_path), f"{stem}_lima2", "master.h5")
    frames = np.arange(npoints * shape[0] * shape[1], dtype=np.uint16).reshape(npoints, *shape)
    os.makedirs(os.path.dirname(master_file), exist_ok=True)
    with h5py.File(master_file, "w") as f:
        f["/entry_0000/processing/frames/data"] = frames
    streams = {"cam2:frames": Lima2Stream.make_definition(
        "cam2:frames", source_name="frames", conductor_hostname="localhost",
        conductor_port=1, acq_uuid="0000", dtype="uint16", shape=list(shape),
        master_file=(master_file, "/entry_0000/processing/frames/data") if saved else None),
        "timer:epoch": Stream.make_definition("timer:epoch", "float64")}
    children = {
        "instrument": Group(attributes={"NX_class": "NXinstrument"}, children={
            "cam2": Group(attributes={"NX_class": "NXdetector"}, children={
                "data": Dataset(attributes={"interpretation": "image"},
                                value=StreamItem(stream="cam2:frames"))})}),
        "measurement": Group(attributes={"NX_class": "NXcollection"}, children={
            "cam2": SoftLink(target_path=f"/{number}.1/instrument/cam2/data"),
            "epoch": StreamItem(stream="timer:epoch")}),
    }
    batches = [{"cam2:frames": np.array([min(i + 4, npoints)], dtype=np.uint32),
                "timer:epoch": 1.7e9 + np.arange(i, min(i + 4, npoints)) * 0.1}
               for i in range(0, npoints, 4)]
    return publish(store, file_path, number, streams, children, batches, **kw)


def badnode_scan(store, file_path, number, **kw):
    """An h5map with a node this writer version does not know: a virtual dataset."""
    from blissdata.h5map import SpaceSelection, VirtualDataset, VirtualSource
    streams = {"diode:diode": Stream.make_definition("diode:diode", "float64")}
    sel = SpaceSelection(start=[0], count=[4])
    children = {"measurement": Group(attributes={"NX_class": "NXcollection"}, children={
        "diode": StreamItem(stream="diode:diode"),
        "vds": VirtualDataset(dtype="<f8", shape=[4], virtual_sources=[VirtualSource(
            vspace=sel, src_file="a.h5", src_dataset="/x", src_space=sel)])})}
    batches = [{"diode:diode": np.arange(4.0)}]
    return publish(store, file_path, number, streams, children, batches, **kw)


def _timeline_publish(store, file_path, number, streams, children, batches, timeline, **kw):
    """publish() that records when each batch was handed to blissdata (for lag figures)."""
    marks = []

    def timed():
        done = 0
        for batch in batches:
            yield batch
            done += len(next(iter(batch.values())))
            marks.append((done, time.time()))

    start = time.time()
    key = publish(store, file_path, number, streams, children, timed(), **kw)
    if timeline:
        import json
        with open(timeline, "w") as f:
            json.dump({"start": start, "end": time.time(), "marks": marks}, f)
    return key


def bench_frames(store, file_path, number, npoints=1000, shape=(512, 512), timeline=None,
                 **kw):
    """Detector-like frames (Poisson counts on a smooth pattern), one per send."""
    streams = {"cam:image": Stream.make_definition("cam:image", "uint16", shape)}
    children = {"instrument": Group(attributes={"NX_class": "NXinstrument"}, children={
        "cam": Group(attributes={"NX_class": "NXdetector"}, children={
            "data": StreamItem(stream="cam:image")})})}
    rng = np.random.default_rng(0)
    y, x = np.mgrid[: shape[0], : shape[1]]
    base = 20 + 15 * np.sin(x / 37.0) ** 2 + 10 * np.cos(y / 23.0) ** 2
    pattern = rng.poisson(base, (8, *shape)).astype(np.uint16)
    batches = ({"cam:image": pattern[i % 8]} for i in range(npoints))
    return _timeline_publish(store, file_path, number, streams, children, batches, timeline,
                             **kw)


def bench_counters(store, file_path, number, channels=64, npoints=1000, rate=50.0,
                   timeline=None, **kw):
    """`channels` float64 counters, one point each at `rate` Hz (a BLISS step scan)."""
    names = [f"ct{i}:value" for i in range(channels)]
    streams = {n: Stream.make_definition(n, "float64") for n in names}
    children = {"measurement": Group(attributes={"NX_class": "NXcollection"}, children={
        n.split(":")[0]: StreamItem(stream=n) for n in names})}

    def batches():
        t0 = time.perf_counter()
        for i in range(npoints):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield {n: np.array([i + k * 1e-3]) for k, n in enumerate(names)}

    return _timeline_publish(store, file_path, number, streams, children, batches(),
                             timeline, **kw)


def bench_scalars(store, file_path, number, channels=64, npoints=100_000, batch=100,
                  timeline=None, **kw):
    """`channels` float64 counters, `batch` points per send, as fast as blissdata publishes
    (fast scalars); the same values as bench/bench_write_cost.py publishes with this
    project's blissdata."""
    names = [f"ct{i}:value" for i in range(channels)]
    streams = {n: Stream.make_definition(n, "float64") for n in names}
    children = {"measurement": Group(attributes={"NX_class": "NXcollection"}, children={
        n.split(":")[0]: StreamItem(stream=n) for n in names})}
    rng = np.random.default_rng(0)
    values = [rng.random(batch) for _ in range(8)]
    batches = ({n: values[(i + c) % 8] for c, n in enumerate(names)}
               for i in range(npoints // batch))
    return _timeline_publish(store, file_path, number, streams, children, batches, timeline,
                             info_extra={"npoints": npoints}, **kw)


def main(argv):
    url, scenario = argv[0], argv[1]
    if scenario == "init":
        if not _initialised(url):
            DataStore(url, init_db=True)  # indexes, the seal function, the protocol key
        return 0
    file_path, number = argv[2], int(argv[3])
    kwargs = {}
    for item in argv[4:]:
        k, v = item.split("=", 1)
        kwargs[k] = eval(v, {})  # test-controlled literals: ints, floats, tuples, strings
    store = DataStore(url)
    fn = {"scalars": scalar_scan, "frames": frame_scan, "links": links_scan,
          "varying": varying_scan, "fallback": fallback_scan,
          "lima": lima_scan, "lima_nosave": lambda *a, **k: lima_scan(*a, saving=False, **k),
          "lima_edf": lambda *a, **k: lima_scan(*a, file_format="EDF", **k),
          "lima2": lima2_scan, "badnode": badnode_scan,
          "bench_frames": bench_frames, "bench_counters": bench_counters,
          "bench_scalars": bench_scalars,
          "aborted": lambda *a, **k: scalar_scan(*a, end_reason="USER_ABORT", stop_after=2, **k),
          "nomap": lambda *a, **k: scalar_scan(*a, h5maps=False, **k)}[scenario]
    key = fn(store, file_path, number, **kwargs)
    print(key, flush=True)
    return 0


def _initialised(url):
    import redis
    return redis.Redis.from_url(url).get("_PROTOCOL_VERSION_") is not None


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a failed publish leaves blissdata's sink threads running: do not hang
