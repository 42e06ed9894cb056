"""The writer service on a real Redis, writing real HDF5 files, read back with h5py."""

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from blissdata import EndReason, bslz4
from writer.commands.validate import validate_file
from writer_helpers import (SEED_STREAMS, durable_points, expected_seed_data, seed_scan,
                            start_writer, wait_status)


@pytest.fixture
def writer(redis_url, data_root, redis_client):
    running = []

    def start(**overrides):
        service, thread = start_writer(redis_url, data_root, **overrides)
        running.append((service, thread))
        time.sleep(0.1)  # let it subscribe before scans are created
        return service

    yield start
    for service, thread in running:
        service.stop()
        thread.join(30)


def read_file(path):
    # the README's recipe is h5py.File(path, "r", swmr=True); locking=False because this
    # process (the writer runs in it) has the scan's file open without HDF5's locking
    return h5py.File(path, "r", swmr=True, locking=False)


def test_seed_scan_written_as_nexus(store, writer, data_root):
    writer()
    path = data_root / "id00" / "sample" / "data.h5"
    scan, data = seed_scan(store, path, npoints=20)
    st = wait_status(store, scan.key)
    assert st.state == "done", st.error
    with read_file(path) as f:
        entry = f["1.1"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert f.attrs["default"] == "1.1"
        assert entry["title"][()].decode() == "ascan roby 0 1 20 0.1"
        assert entry["end_reason"][()].decode() == "SUCCESS"
        for name in ("start_time", "end_time"):
            assert name in entry
        assert entry["start_time"][()].decode() == scan.info["start_time"]
        assert entry["instrument"].attrs["NX_class"] == "NXinstrument"
        assert entry["instrument/name"][()].decode() == "esrf-id00a"
        assert entry["instrument/name"].attrs["short_name"] == "id00"
        diode = entry["instrument/diode/data"]
        assert np.array_equal(diode[()], data[SEED_STREAMS[0]])
        assert entry["instrument/elapsed_time/value"].attrs["units"] == "s"
        # the same stream at two places is one dataset (hard link), written once
        assert entry["measurement/diode"].id == diode.id
        plot = entry[entry.attrs["default"]]
        assert plot.attrs["NX_class"] == "NXdata"
        assert plot.attrs["signal"] in plot
    for stream in SEED_STREAMS:
        assert durable_points(store, scan.key, stream) == 20
    report = validate_file(path)
    assert report.ok, report.errors


def test_frames_raw_and_precompressed(store, writer, data_root):
    writer()
    path = data_root / "frames.h5"  # no mapping in the header: the default one
    scan = store.create_scan({"session": "s", "name": "timescan", "number": 4,
                              "path": str(path)},
                             info={"title": "timescan", "type": "timescan", "scan_nb": 4})
    raw = scan.create_stream("cam:image", "uint16", (256, 512))
    packed = scan.create_stream("cam2:image", "uint16", (256, 512), encoding="bslz4")
    mca = scan.create_stream("mca:spectrum", "uint32", (-1,))
    scan.prepare()
    scan.start()
    rng = np.random.default_rng(3)
    frames = rng.poisson(20, (9, 256, 512)).astype(np.uint16)  # 1 frame per chunk
    chunks = [bslz4.compress(f) for f in frames]
    spectra = [np.arange(n, dtype=np.uint32) + 1 for n in (5, 8, 3)]
    raw.send(frames[:4])
    raw.send(frames[4:])
    packed.send_chunks(chunks[:5])
    packed.send_chunks(chunks[5:])
    mca.send(spectra)
    scan.close()
    st = wait_status(store, scan.key)
    assert st.state == "done", st.error
    with read_file(path) as f:
        m = f["4.1/measurement"]
        assert np.array_equal(m["cam_image"][()], frames)
        assert np.array_equal(m["cam2_image"][()], frames)
        # pre-compressed frames are stored as they came, not recompressed
        for i, chunk in enumerate(chunks):
            assert m["cam2_image"].id.read_direct_chunk((i, 0, 0))[1] == chunk
        assert m["mca_spectrum"].shape == (3, 8)
        for i, s in enumerate(spectra):
            assert np.array_equal(m["mca_spectrum"][i, : len(s)], s)
            assert (m["mca_spectrum"][i, len(s):] == 0).all()
    assert validate_file(path).ok


def test_bounded_lag_while_scan_runs(store, writer, data_root):
    writer(max_lag_s=0.3)
    path = data_root / "live.h5"
    scan, data = seed_scan(store, path, npoints=10, close=False)
    deadline = time.monotonic() + 5
    while durable_points(store, scan.key, SEED_STREAMS[0]) < 10:
        assert time.monotonic() < deadline, "data not durable within 5 s"
        time.sleep(0.02)
    # durable means a reader of the file sees it now, while the scan is still open
    with read_file(path) as f:
        assert np.array_equal(f["1.1/instrument/diode/data"][()], data[SEED_STREAMS[0]])
    backing = scan.streams[SEED_STREAMS[0]].file_backing
    assert backing == {"file": str(data_root / "live" / "live_1.1.h5"),
                       "dataset": "/1.1/instrument/diode/data",
                       "points": 10}
    scan.close()
    assert wait_status(store, scan.key).state == "done"


def test_several_sessions_and_scans_in_one_file(store, writer, data_root):
    writer()
    path = data_root / "shared.h5"
    scans = []
    for number, session in ((1, "a"), (2, "b"), (3, "a")):
        scans.append(seed_scan(store, path, number=number, npoints=5 + number,
                               session=session, close=False))
    for scan, _ in scans:
        scan.close()
    for scan, _ in scans:
        assert wait_status(store, scan.key).state == "done"
    with read_file(path) as f:
        assert sorted(f) == ["1.1", "2.1", "3.1"]
        for scan, data in scans:
            got = f[f"{scan.number}.1/measurement/epoch"][()]
            assert np.array_equal(got, data[SEED_STREAMS[2]])


def test_session_filter_and_per_scan_files(store, writer, data_root):
    writer(sessions=["wanted"], file_layout="per_scan")
    other, _ = seed_scan(store, data_root / "x.h5", number=1, session="other")
    mine, _ = seed_scan(store, data_root / "x.h5", number=7, session="wanted")
    assert wait_status(store, mine.key).state == "done"
    assert (data_root / "x_0007.h5").exists()
    time.sleep(0.3)
    from writer.state import status as writer_status

    assert writer_status.read(store.redis, other.key) is None
    assert not (data_root / "x_0001.h5").exists()


def test_scan_with_save_false_gets_no_file(store, writer, data_root):
    writer()
    path = data_root / "unsaved.h5"
    scan = store.create_scan({"session": "test_session", "name": "ct", "number": 1,
                              "path": str(path)},
                             info={"title": "ct 0.1", "type": "ct", "scan_nb": 1, "save": False})
    diode = scan.create_stream("diode", "float64")
    scan.prepare()
    scan.start()
    diode.send([1.0, 2.0])
    scan.close()
    assert wait_status(store, scan.key).state == "skipped"
    assert not path.exists()
    saved, _ = seed_scan(store, data_root / "saved.h5", number=2)  # the next one is written
    assert wait_status(store, saved.key).state == "done"


def test_existing_entry_is_never_overwritten(store, writer, data_root):
    writer()
    path = data_root / "taken.h5"
    with h5py.File(path, "w") as f:
        f.create_group("1.1").create_dataset("precious", data=[1, 2, 3])
    scan, _ = seed_scan(store, path, number=1)
    st = wait_status(store, scan.key)
    assert st.state == "failed"
    assert "1.1" in st.error and str(path) in st.error
    with read_file(path) as f:
        assert list(f["1.1"]) == ["precious"]
        assert list(f["1.1/precious"][()]) == [1, 2, 3]


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink", "relative"])
def test_paths_outside_data_roots_are_refused(store, writer, data_root, tmp_path, where):
    writer()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if where == "outside":
        path = outside / "x.h5"
    elif where == "dotdot":
        path = f"{data_root}/../elsewhere/x.h5"
    elif where == "symlink":
        (data_root / "link").symlink_to(outside)
        path = data_root / "link" / "x.h5"
    else:
        path = "relative/x.h5"
    scan, _ = seed_scan(store, path, number=1)
    st = wait_status(store, scan.key)
    assert st.state == "failed"
    assert "x.h5" in st.error
    assert not (outside / "x.h5").exists()


def test_bad_mappings_fail_only_their_scan(store, writer, data_root):
    writer()
    bad_kind = [{"NX_class": "NXentry"}, {"d": [{}, "STRAEM", "timer:epoch"]}]
    missing = [{"NX_class": "NXentry"}, {"d": [{}, "STREAM", "no:such:stream"]}]
    s1, _ = seed_scan(store, data_root / "a.h5", number=1, mapping=bad_kind)
    s2, _ = seed_scan(store, data_root / "b.h5", number=2, mapping=missing)
    s3, _ = seed_scan(store, data_root / "c.h5", number=3)
    st1, st2 = wait_status(store, s1.key), wait_status(store, s2.key)
    assert st1.state == "failed" and "/d" in st1.error and "STRAEM" in st1.error
    assert st2.state == "failed" and "no:such:stream" in st2.error
    assert wait_status(store, s3.key).state == "done"


def test_paused_scan_goes_idle_then_resumes(store, writer, data_root):
    """A scan quiet for longer than inactivity_timeout_s is paused, not failed."""
    writer(inactivity_timeout_s=0.5)
    scan, data = seed_scan(store, data_root / "paused.h5", close=False, npoints=8)
    st = wait_status(store, scan.key, states=("idle", "done", "failed"))
    assert st.state == "idle" and st.points[SEED_STREAMS[0]] == 8 and not st.error
    with read_file(data_root / "paused.h5") as f:  # what came is in the file
        assert np.array_equal(f["1.1/measurement/diode"][()], data[SEED_STREAMS[0]])
    time.sleep(1.0)  # well past the timeout: still idle, not failed
    assert wait_status(store, scan.key, states=("idle", "failed")).state == "idle"
    more = expected_seed_data(16)
    streams = scan.streams
    scan.send_many({streams[n]: more[n][8:] for n in SEED_STREAMS})
    assert wait_status(store, scan.key, states=("writing", "failed")).state == "writing"
    scan.stop()
    scan.close()
    st = wait_status(store, scan.key)
    assert st.state == "done" and st.points[SEED_STREAMS[0]] == 16
    with read_file(data_root / "paused.h5") as f:
        assert np.array_equal(f["1.1/measurement/diode"][()], more[SEED_STREAMS[0]])


def test_idle_scan_ends_when_deleted(store, writer, data_root):
    writer(inactivity_timeout_s=0.3)
    scan, data = seed_scan(store, data_root / "forgotten.h5", close=False, npoints=5)
    assert wait_status(store, scan.key, states=("idle", "failed")).state == "idle"
    store.delete_scan(scan.key)  # what the memory tracker's --inactive-ttl does
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with read_file(data_root / "forgotten.h5") as f:
            if f["1.1/end_reason"][()]:  # made empty with the entry (SWMR), filled at the end
                assert f["1.1/end_reason"][()] == b"DELETION"
                assert np.array_equal(f["1.1/measurement/diode"][()], data[SEED_STREAMS[0]])
                return
        time.sleep(0.05)
    raise AssertionError("the deleted scan's entry was not ended")


def test_scan_deleted_mid_way(store, writer, data_root):
    writer()
    scan, data = seed_scan(store, data_root / "gone.h5", close=False, npoints=8)
    deadline = time.monotonic() + 5
    while durable_points(store, scan.key, SEED_STREAMS[0]) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    store.delete_scan(scan.key)
    st = wait_status(store, scan.key)
    assert st.state == "failed" and "deleted" in st.error
    with read_file(data_root / "gone.h5") as f:
        assert len(f["1.1/measurement/diode"]) == 8
        assert f["1.1/end_reason"][()].decode() == "DELETION"


def test_dtype_changed_mid_stream(store, writer, data_root):
    writer()
    scan, _ = seed_scan(store, data_root / "changed.h5", close=False, npoints=5)
    wait_status(store, scan.key, states=("writing",))  # the writer has read the definitions
    # another producer version redefines a stream after prepare
    streams = json.loads(store.redis.hget(scan.key, "streams"))
    streams[SEED_STREAMS[0]]["dtype"] = "<i4"
    store.redis.hset(scan.key, "streams", json.dumps(streams))
    scan.stop()  # a state change makes readers reload the definitions
    st = wait_status(store, scan.key)
    assert st.state == "failed" and "definition changed" in st.error
    assert SEED_STREAMS[0] in st.error


def test_file_locked_by_another_program(store, writer, data_root):
    writer()
    path = data_root / "locked.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys, time\n"
         f"f = h5py.File({str(path)!r}, 'w')\nprint('open', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        scan, _ = seed_scan(store, path)
        ok, _ = seed_scan(store, data_root / "free.h5", number=2)
        st = wait_status(store, scan.key)
        assert st.state == "failed" and "lock" in st.error and str(path) in st.error
        assert wait_status(store, ok.key).state == "done"
    finally:
        holder.kill()
        holder.wait()


def test_redis_connection_lost_then_back(store, writer, data_root):
    writer()
    scan, data = seed_scan(store, data_root / "reconnect.h5", close=False, npoints=10)
    deadline = time.monotonic() + 5
    while durable_points(store, scan.key, SEED_STREAMS[0]) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # cut every client connection but ours, as a network glitch or server restart would
    me = store.redis.client_id()
    for client in store.redis.client_list():
        if int(client["id"]) != me:
            store.redis.client_kill_filter(_id=int(client["id"]))
    more = np.arange(10, 15) * 0.1
    scan.send_many({s: np.sin(more) if i == 0 else more for i, s in
                    enumerate(scan.streams.values())})
    scan.close(EndReason.SUCCESS)
    st = wait_status(store, scan.key)
    assert st.state == "done", st.error
    with read_file(data_root / "reconnect.h5") as f:
        got = f["1.1/instrument/diode/data"][()]
    assert np.array_equal(got, np.sin(np.arange(15) * 0.1))
