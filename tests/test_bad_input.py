"""Bad input from producers, met by a real `blisswriter run` process: each bad scan fails with
a reason naming what was wrong and where, keeps what came before, and the writer goes on
serving the next scan. Also the talk's own way of writing a mapping (Python tuples)."""

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from blissdata import EXTERNAL_LINK, RAW, SOFT_LINK, STREAM, SchemaError, bslz4, keys
from blissdata.encoding import decode, make_definition, raw_chunks
from blissdata.exceptions import MalformedEntryError
from writer_helpers import SEED_STREAMS, seed_scan, stop_process, wait_status


@pytest.fixture
def writer_process(store, data_root, tmp_path):
    """Factory: start a real writer process (it also takes the scans already unfinished)."""
    procs = []

    def start():
        log = open(tmp_path / f"writer{len(procs)}.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "writer.commands.cli", "run", "--redis", store.url,
             "--data-root", str(data_root)], stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    yield start
    for proc in procs:
        stop_process(proc)


def next_scan_is_written(store, data_root, number=99):
    """The writer still serves: a good scan after the bad one is written in full."""
    scan, data = seed_scan(store, data_root / f"next{number}.h5", number=number, npoints=9)
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "done", st.error
    with h5py.File(data_root / f"next{number}.h5", "r", locking=False) as f:
        assert np.array_equal(f[f"{number}.1/instrument/diode/data"][()], data[SEED_STREAMS[0]])


# ---- 1. the talk's mapping, with tuples and the kinds as constants ---------------------------

def test_talk_mapping_with_tuples_is_stored_as_json_and_written(store, writer_process,
                                                                data_root):
    writer_process()
    path = data_root / "talk.h5"
    scan = store.create_scan({"session": "id00", "name": "loopscan", "number": 1,
                              "path": str(path)}, info={"title": "loopscan 5 0.1", "type": "loopscan", "scan_nb": 1})
    scan.info["mapping"] = (   # as in the talk, word for word but for the constants' import
        {"NX_class": "NXentry"},
        {
            "instrument": (
                {"NX_class": "NXinstrument"},
                {
                    "name": ({"short_name": "id00"}, RAW, "esrf-id00a"),
                    "diode": ({"NX_class": "NXdetector"},
                              {"data": ({}, STREAM, "simulation_diode_sampling_controller:diode")}),
                    "elapsed_time": ({"NX_class": "NXpositioner"},
                                     {"value": ({"units": "s"}, STREAM, "timer:elapsed_time")}),
                    "epoch": ({"NX_class": "NXpositioner"},
                              {"value": ({"units": "s"}, STREAM, "timer:epoch")}),
                },
            ),
            "measurement": (
                {},
                {
                    "diode": ({}, STREAM, "simulation_diode_sampling_controller:diode"),
                    "elapsed_time": ({"units": "s"}, STREAM, "timer:elapsed_time"),
                    "epoch": ({"units": "s"}, STREAM, "timer:epoch"),
                    "again": ({}, SOFT_LINK, "/instrument/diode/data"),
                    "shape": ({}, RAW, (np.int64(5), 1)),
                },
            ),
        },
    )
    streams = [scan.create_stream(n, "float64") for n in SEED_STREAMS]
    scan.prepare()
    stored = json.loads(store.redis.hget(scan.key, "info"))["mapping"]
    assert stored[1]["instrument"][1]["name"] == [{"short_name": "id00"}, "RAW", "esrf-id00a"]
    assert stored[1]["measurement"][1]["shape"][2] == [5, 1]
    scan.start()
    for s in streams:
        s.send(np.arange(5.0))
    scan.close()
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "done", st.error
    with h5py.File(path, "r", locking=False) as f:
        entry = f["1.1"]
        assert entry["instrument/name"][()] == b"esrf-id00a"
        assert np.array_equal(entry["measurement/again"][()], np.arange(5.0))
        assert entry["measurement/elapsed_time"].attrs["units"] == "s"
    assert (RAW, STREAM, SOFT_LINK, EXTERNAL_LINK) == ("RAW", "STREAM", "SOFT_LINK",
                                                       "EXTERNAL_LINK")


def test_info_value_json_cannot_hold_is_refused_naming_it(new_scan):
    scan = new_scan()
    scan.info["mapping"] = ({}, {"x": ({}, RAW, {1, 2})})
    with pytest.raises(SchemaError, match=r"\$\.mapping\[1\]\.x\[2\]: a value of type set"):
        scan.prepare()



def test_create_scan_takes_numpy_values_and_tuples_in_info(store):
    info = {"title": "ct", "type": "ct", "scan_nb": np.int64(1), "npoints": np.int32(3),
            "count_time": np.float32(0.5), "positions": (np.float64(1.5), 2)}
    scan = store.create_scan({"session": "s", "name": "ct", "number": 1, "path": "/tmp/x.h5"},
                             info=info)
    assert store.load_scan(scan.key).info == {"title": "ct", "type": "ct", "scan_nb": 1,
                                              "npoints": 3, "count_time": 0.5,
                                              "positions": [1.5, 2]}
    with pytest.raises(SchemaError, match=r"info \$\.tags: a value of type set"):
        store.create_scan({"session": "s", "name": "ct", "number": 2, "path": "/tmp/x.h5"},
                          info={"tags": {"a"}})

# ---- 2. a payload that does not fit its stream ----------------------------------------------

@pytest.mark.parametrize("encoding, bad_entry, reason", [
    # another producer (version) writes 5 bytes declared as 2 int32 points
    ("numeric", {"n": 2, "d": b"\x01" * 5}, "5 bytes of payload, expected 8"),
    # ... or a compressed frame of another size
    ("bslz4", {"n": 1, "z": None, "d": bslz4.compress(np.zeros((2, 2), np.int32))},
     "chunk 0 holds 16 bytes once decompressed, a frame of <i4 (4, 4) is 64"),
])
def test_malformed_payload_fails_the_scan_naming_stream_and_points(
        store, writer_process, data_root, encoding, bad_entry, reason):
    writer_process()
    path = data_root / "malformed.h5"
    scan = store.create_scan({"session": "s", "name": "ct", "number": 1, "path": str(path)},
                             info={"title": "ct", "type": "ct", "scan_nb": 1})
    shape = () if encoding == "numeric" else (4, 4)
    counts = scan.create_stream("counts", "int32", shape, encoding=encoding)
    scan.prepare()
    scan.start()
    good = np.arange(4 * int(np.prod(shape)), dtype=np.int32).reshape((4, *shape))
    counts.send(good)
    if encoding == "bslz4":
        bad_entry["z"] = json.dumps([len(bad_entry["d"])])
    store.redis.xadd(keys.data_key(scan.key, "counts"), bad_entry, id=keys.entry_id(4))
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "failed"
    assert "'counts'" in st.error and f"points [4, {4 + bad_entry['n']})" in st.error
    assert reason in st.error and "internal error" not in st.error
    assert "4 points kept" in st.error
    with h5py.File(path, "r", locking=False) as f:
        assert np.array_equal(f["1.1/measurement/counts"][()], good)
    next_scan_is_written(store, data_root)


@pytest.mark.parametrize("encoding, fields, expected", [
    ("numeric", {b"n": b"2", b"d": b"12345"}, "5 bytes of payload, expected 8"),
    ("numeric", {b"d": b"12345678"}, "field n (number of points) is None"),
    ("varying", {b"n": b"1", b"s": b"[[3]]", b"d": b"1234"}, "the point shapes need 12"),
    ("varying", {b"n": b"2", b"s": b"[[3]]", b"d": b""}, "do not fit 2 points"),
    ("json", {b"n": b"2", b"d": b"[1,"}, "payload is not JSON"),
    ("json", {b"n": b"2", b"d": b"[1]"}, "payload holds 1 points, expected a list of 2"),
    ("bslz4", {b"n": b"1", b"z": b"[20]", b"d": b"x" * 12}, "the chunk sizes add up to 20"),
    ("bslz4", {b"n": b"1", b"z": b"[4]", b"d": b"xxxx"}, "chunk 0: bslz4 chunk truncated"),
])
def test_decode_names_what_does_not_fit(encoding, fields, expected):
    defn = {"numeric": make_definition("c", "int32"),
            "varying": make_definition("m", "int32", (-1,)),
            "json": make_definition("j", encoding="json"),
            "bslz4": make_definition("f", "uint16", (4, 4), encoding="bslz4")}[encoding]
    with pytest.raises(MalformedEntryError,
                       match=rf"stream '{defn.name}': .*{re.escape(expected)}"):
        decode(defn, fields, 10)
    if encoding == "bslz4":
        with pytest.raises(MalformedEntryError, match="points \\[10, 11\\)"):
            raw_chunks(fields, defn, 10)


# ---- 3. a stream redefined mid-scan ---------------------------------------------------------

def _redefine(store, scan, name, dtype):
    streams = json.loads(store.redis.hget(scan.key, "streams"))
    streams[name]["dtype"] = dtype
    store.redis.hset(scan.key, "streams", json.dumps(streams))


@pytest.mark.parametrize("writer_starts", ["before", "after the change"])
def test_redefined_stream_keeps_the_points_sent_before(store, writer_process, data_root,
                                                       writer_starts):
    """The same outcome whether the writer read the definitions before or after another
    producer rewrote them (the race behind test_dtype_changed_mid_stream's random failure)."""
    if writer_starts == "before":
        writer_process()
    path = data_root / "changed.h5"
    scan, data = seed_scan(store, path, close=False, npoints=5)
    _redefine(store, scan, SEED_STREAMS[0], "<i4")
    scan.stop()
    if writer_starts != "before":
        writer_process()
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "failed" and "definition changed" in st.error, st.error
    assert repr(SEED_STREAMS[0]) in st.error and "was numeric <f8 ()" in st.error
    assert "15 points kept" in st.error  # 5 points x 3 streams
    with h5py.File(path, "r", locking=False) as f:
        assert np.array_equal(f["1.1/instrument/diode/data"][()], data[SEED_STREAMS[0]])
    next_scan_is_written(store, data_root)


def test_reader_decodes_with_the_prepared_definition(store, data_root):
    scan, data = seed_scan(store, data_root / "r.h5", close=False, npoints=5)
    _redefine(store, scan, SEED_STREAMS[0], "<i4")
    reader = store.load_scan(scan.key)
    diode = reader.streams[SEED_STREAMS[0]]
    assert diode.dtype == np.float64 and np.array_equal(diode[:], data[SEED_STREAMS[0]])
    assert reader.redefined[SEED_STREAMS[0]].dtype == "<i4"


# ---- 4. names the writer derives are valid NeXus names --------------------------------------

def test_derived_names_are_valid_nexus_unique_and_keep_the_stream_name(store, writer_process,
                                                                       data_root):
    from writer.commands.validate import validate_file

    writer_process()
    path = data_root / "names.h5"
    scan = store.create_scan({"session": "s", "name": "ct", "number": 1, "path": str(path)},
                             info={"title": "ct", "type": "ct", "scan_nb": 1})
    names = ["ü:ñ", "😀:emoji", "a:b", "a_b", "a/b", "1st", "diode"]
    streams = [scan.create_stream(n, "float64") for n in names]
    scan.prepare()
    scan.start()
    for i, s in enumerate(streams):
        s.send(np.full(3, float(i)))
    scan.close()
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "done", st.error
    assert not st.warnings
    expected = {"u_n": "ü:ñ", "__emoji": "😀:emoji", "a_b": "a:b", "a_b_": "a_b",
                "a_b__": "a/b", "_1st": "1st", "diode": "diode"}
    with h5py.File(path, "r", locking=False) as f:
        measurement = f["1.1/measurement"]
        assert sorted(measurement) == sorted(expected)
        for i, name in enumerate(names):
            dataset = next(k for k, v in expected.items() if v == name)
            assert np.array_equal(measurement[dataset][()], np.full(3, float(i)))
            if dataset != name:
                assert measurement[dataset].attrs["stream_name"] == name
            else:
                assert "stream_name" not in measurement[dataset].attrs
    report = validate_file(path)
    assert report.ok, report.errors
    assert not [w for w in report.warnings if "name" in w and "'1.1'" not in w], \
        report.warnings


def test_explicit_names_are_kept_with_a_warning(store, writer_process, data_root):
    writer_process()
    path = data_root / "explicit.h5"
    mapping = ({"NX_class": "NXentry"}, {"measurement": ({"NX_class": "NXcollection"}, {
        "ü:ñ": ({}, STREAM, SEED_STREAMS[0]), "2theta": ({}, STREAM, SEED_STREAMS[1]),
        "epoch": ({}, STREAM, SEED_STREAMS[2])})})
    scan, data = seed_scan(store, path, npoints=4, mapping=mapping)
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "done", st.error
    assert any("/measurement/ü:ñ" in w and "/measurement/2theta" in w and "epoch" not in w
               for w in st.warnings), st.warnings
    with h5py.File(path, "r", locking=False) as f:
        assert np.array_equal(f["1.1/measurement/ü:ñ"][()], data[SEED_STREAMS[0]])
        assert "2theta" in f["1.1/measurement"]


# ---- 5. a default plot everywhere ------------------------------------------------------------

def test_every_file_written_has_a_default_plot(store, writer_process, data_root):
    from blissdata.fixtures import publish
    from writer.commands.validate import validate_file

    writer_process()
    path = data_root / "frames" / "external.h5"
    (scan,) = publish(store, "external_frames", session="s", path=str(path), npoints=12)
    assert wait_status(store, scan.key, timeout=60).state == "done"
    files = sorted(path.parent.glob("*.h5"))
    assert [p.name for p in files] == ["eiger_0000.h5", "eiger_0001.h5", "external.h5"]
    for p in files:  # the writer's file and the simulated detector's own files
        report = validate_file(p)
        assert report.ok, (p, report.errors)
    with h5py.File(files[0], "r") as f:
        plot = f[f.attrs["default"]][f[f.attrs["default"]].attrs["default"]]
        assert plot["data"].shape == f["entry_0000/data"].shape


def test_validate_reports_a_missing_default_plot(tmp_path):
    from writer.commands.validate import validate_file

    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        for name in ("a", "b"):
            entry = f.create_group(name)
            entry.attrs["NX_class"] = "NXentry"
            data = entry.create_group("data")
            data.attrs.update({"NX_class": "NXdata", "signal": "y"})
            data["y"] = np.arange(3.0)
        f["a"].attrs["default"] = "data"
        f["b"].attrs["default"] = "nothing"
    errors = validate_file(path).errors
    assert any(e.startswith("/: no default plot: @default is missing") for e in errors)
    assert any(e.startswith("/b: no default plot: @default = 'nothing'") for e in errors)
    assert not [e for e in errors if e.startswith("/a:")]
    with h5py.File(path, "a") as f:
        f.attrs["default"] = "a"
        f["b"].attrs["default"] = "data"
        f["b/data"].attrs["signal"] = "z"
    errors = validate_file(path).errors
    assert [e for e in errors if "default plot" in e] == [
        "/b: no default plot: /b/data@signal = 'z' is not a field of that group"]


def test_grid_axes_named_after_streams_are_valid_and_distinct(tmp_path):
    from writer.scan.grid_plot import write_grid_plot
    from writer.scan.names import NEXUS_NAME

    with h5py.File(tmp_path / "g.h5", "w") as f:
        entry = f.create_group("1.1")
        plot = entry.create_group("plot")
        plot.attrs.update({"NX_class": "NXdata", "signal": "x"})
        plot["x"] = np.arange(6.0)
        entry.attrs["default"] = "plot"
        streams = {"a:2theta": entry.create_dataset("m1", data=np.repeat([0.0, 1.0], 3)),
                   "b:2theta": entry.create_dataset("m2", data=np.tile([5.0, 6.0, 7.0], 2))}
        assert write_grid_plot(entry, {"grid_shape": [2, 3], "grid_axes": list(streams)},
                               streams) is None
        grid = entry["grid"]
        axes = list(grid.attrs["axes"])
        assert axes == ["_2theta", "_2theta_"] and all(NEXUS_NAME.match(a) for a in axes)
        assert [grid[a].attrs["stream_name"] for a in axes] == list(streams)
        assert np.array_equal(grid["_2theta_"][()], [5.0, 6.0, 7.0])
