"""blissdata core against a real Redis server: scans, streams, cursors, bad input."""

import threading
import time

import h5py
import numpy as np
import pytest
import redis

from blissdata import (DataStore, EndOfStream, EndReason, IndexNotYetThereError,
                       IndexWontBeThereError, NoScanAvailable, ScanNotFoundError, ScanState,
                       ScanStateError, SchemaError, StreamError, StreamSealedError)

from blissdata.exceptions import EventTooLargeError, ProtocolVersionError
from blissdata.redis_server import EmbeddedRedis
from blissdata import keys


def started(scan):
    scan.prepare()
    scan.start()
    return scan


# ---- connection ---------------------------------------------------------------------------

def test_unreachable_redis_names_the_url():
    with pytest.raises(ConnectionError, match="redis://127.0.0.1:1"):
        DataStore("redis://127.0.0.1:1", socket_connect_timeout=0.5)


def test_unix_socket_and_password_urls():
    with EmbeddedRedis(unix_socket=True, extra_args=["--requirepass", "s3cret"]) as server:
        with pytest.raises(ConnectionError, match="authentication|NOAUTH|cannot reach"):
            DataStore(server.url)
        store = DataStore(server.url.replace("unix://", "unix://:s3cret@"))
        assert store.redis.ping()


def test_acl_user_url():
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("writer", enabled=True, passwords=["+pw"], keys=["*"],
                          commands=["+@all"], channels=["*"])
        url = server.url.replace("redis://", "redis://writer:pw@")
        assert DataStore(url).redis.acl_whoami() in ("writer", b"writer")


def test_protocol_version_is_checked(store, redis_client):
    redis_client.set(keys.PROTOCOL_KEY, 999)
    with pytest.raises(ProtocolVersionError, match="999"):
        DataStore(store.url)


# ---- scans and their states ---------------------------------------------------------------

def test_state_machine_and_end_reason(store, new_scan):
    scan = new_scan()
    assert scan.state == ScanState.CREATED
    with pytest.raises(ScanStateError, match="cannot go to STARTED from CREATED"):
        scan.start()
    scan.prepare()
    with pytest.raises(ScanStateError, match="PREPARED"):
        scan.prepare()
    scan.start()
    assert "start_time" in scan.info
    with pytest.raises(ScanStateError):
        scan.prepare()
    scan.stop()
    scan.close(EndReason.SUCCESS)
    with pytest.raises(ScanStateError, match="already CLOSED"):
        scan.close()
    reader = store.load_scan(scan.key)
    assert reader.state == ScanState.CLOSED
    assert reader.info["end_reason"] == "SUCCESS"
    assert reader.identity == {"session": "test_session", "name": "ascan", "number": 1,
                               "path": "/tmp/never-written.h5"}


def test_abort_from_started(store, new_scan):
    scan = started(new_scan())
    scan.close(EndReason.USER_ABORT)
    assert store.load_scan(scan.key).info["end_reason"] == "USER_ABORT"


def test_reader_waits_for_states(store, new_scan):
    scan = new_scan()
    reader = store.load_scan(scan.key)
    assert not reader.update(block=True, timeout=0.05)
    seen = []

    def follow():
        while reader.state != ScanState.CLOSED:
            if reader.update(block=True, timeout=5):
                seen.append(reader.state)

    t = threading.Thread(target=follow)
    t.start()
    scan.prepare()
    time.sleep(0.05)
    scan.start()
    time.sleep(0.05)
    scan.stop()
    time.sleep(0.05)
    scan.close()
    t.join(10)
    assert seen[-1] == ScanState.CLOSED
    assert seen == sorted(seen)
    assert reader.info["end_reason"] == "SUCCESS"


def test_info_schema_names_the_path(new_scan):
    scan = new_scan(info={"channels": {"diode": {"unit": 3}}})
    with pytest.raises(SchemaError, match=r"\$\.channels\.diode\.unit"):
        scan.prepare()
    assert scan.state == ScanState.CREATED
    scan2 = new_scan(number=2)
    del scan2.info["title"]
    with pytest.raises(SchemaError, match="'title' is a required property"):
        scan2.prepare()


def test_bad_identity(store):
    with pytest.raises(ValueError, match="misses"):
        store.create_scan({"session": "s"})
    with pytest.raises(ValueError, match="number"):
        store.create_scan({"session": "s", "name": "n", "number": -1, "path": "/x"})


def test_load_missing_scan(store):
    with pytest.raises(ScanNotFoundError, match="nope"):
        store.load_scan("nope")


def test_next_scan_misses_none_between_calls(store, new_scan):
    new_scan(number=0)  # created before anyone listens
    since = store.get_next_scan(since="0-0", timeout=1)[0]
    keys_created = [new_scan(number=i).key for i in range(1, 6)]  # while "not listening"
    got = []
    for _ in keys_created:
        since, key = store.get_next_scan(since=since, timeout=1)
        got.append(key)
    assert got == keys_created
    with pytest.raises(NoScanAvailable):
        store.get_next_scan(since=since, timeout=0.05)
    with pytest.raises(NoScanAvailable):
        store.get_next_scan(since=since, block=False)


def test_next_scan_blocks_and_filters_session(store, new_scan):
    result = {}

    def wait():
        result["v"] = store.get_next_scan(session="b", timeout=5)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    new_scan(session="a")
    wanted = new_scan(session="b")
    t.join(5)
    assert result["v"][1] == wanted.key


def test_last_scan_search_and_delete(store, new_scan):
    a1 = new_scan(session="a", number=1, name="ascan")
    a2 = new_scan(session="a", number=2, name="ct")
    b1 = new_scan(session="b", number=1, name="ascan")
    assert store.get_last_scan(session="a") == a2.key
    assert store.get_last_scan() == b1.key
    assert store.search_scans(session="a") == [a1.key, a2.key]
    assert store.search_scans(name="ascan") == [a1.key, b1.key]
    assert store.search_scans(session="a", number=2) == [a2.key]
    with pytest.raises(NoScanAvailable):
        store.get_last_scan(session="nobody")
    stream = a1.create_stream("x", "float64")
    started(a1)
    stream.send(np.arange(3.0))
    store.delete_scan(a1.key)
    with pytest.raises(ScanNotFoundError):
        store.load_scan(a1.key)
    assert store.search_scans(session="a") == [a2.key]
    assert not store.redis.exists(stream.key)


# ---- streams: producer side ---------------------------------------------------------------

def test_send_bad_dtype_or_shape_writes_nothing(store, new_scan):
    scan = new_scan()
    cam = scan.create_stream("cam", "uint16", (4, 5))
    started(scan)
    with pytest.raises(ValueError, match=r"'cam'.*expected point shape \(4, 5\).*\(5, 4\)"):
        cam.send(np.zeros((2, 5, 4), np.uint16))
    with pytest.raises(ValueError, match=r"'cam': expected dtype uint16, got float64"):
        cam.send(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="do not fit"):
        cam.send(np.full((4, 5), -1))
    assert len(store.load_scan(scan.key).streams["cam"]) == 0
    cam.send(np.zeros((4, 5), np.int64))  # integers that fit are fine
    assert len(cam) == 1


def test_bad_stream_declarations(new_scan):
    scan = new_scan()
    with pytest.raises(ValueError, match="not a numpy dtype"):
        scan.create_stream("a", "floaty")
    with pytest.raises(ValueError, match="encoding"):
        scan.create_stream("a", "float64", encoding="zip")
    with pytest.raises(ValueError, match="needs a dtype"):
        scan.create_stream("a")
    scan.create_stream("a", "float64")
    with pytest.raises(StreamError, match="already declared"):
        scan.create_stream("a", "float64")
    scan.prepare()
    with pytest.raises(ScanStateError, match="before prepare"):
        scan.create_stream("b", "float64")


def test_send_after_seal_and_second_seal(new_scan):
    scan = new_scan()
    s = scan.create_stream("s", "float64")
    with pytest.raises(ScanStateError, match="CREATED"):
        s.send(1.0)
    started(scan)
    s.send(1.0)
    assert s.seal() == 1
    with pytest.raises(StreamSealedError, match="is sealed"):
        s.send(2.0)
    with pytest.raises(StreamSealedError, match="already sealed"):
        s.seal()
    scan.close()
    assert len(s) == 1 and s.sealed


def test_event_size_limit(redis_url, redis_client):
    store = DataStore(redis_url, max_event_bytes=1000)
    scan = store.create_scan({"session": "s", "name": "n", "number": 1, "path": "/x"},
                             {"title": "t", "type": "ct", "scan_nb": 1})
    small = scan.create_stream("small", "float64")
    big = scan.create_stream("big", "float64", (200,))
    started(scan)
    with pytest.raises(EventTooLargeError, match="1600 bytes"):
        big.send(np.zeros(200))
    small.send(np.arange(1000.0))  # split into entries of <= 1000 bytes
    assert redis_client.xlen(small.key) == 8
    assert np.array_equal(small[:], np.arange(1000.0))


# ---- streams: reader side -----------------------------------------------------------------

def test_indexing_errors(store, new_scan):
    scan = new_scan()
    s = scan.create_stream("s", "int32")
    started(scan)
    s.send(np.arange(10, dtype=np.int32))
    r = store.load_scan(scan.key).streams["s"]
    assert r[9] == 9 and r[-1] == 9
    assert list(r[2:8:3]) == [2, 5]
    assert r[20:30].shape == (0,) and r[7:3].shape == (0,)
    assert list(r[-3:]) == [7, 8, 9]
    with pytest.raises(ValueError, match="step must be >= 1"):  # as h5py
        r[::-1]
    with pytest.raises(IndexNotYetThereError, match="10 points so far"):
        r[10]
    s.seal()
    with pytest.raises(IndexWontBeThereError, match="sealed at 10"):
        r[10]
    with pytest.raises(IndexError):
        r[-11]


def test_every_encoding_round_trips(store, new_scan, tmp_path):
    from blissdata import bslz4
    detector_frames = np.arange(5 * 4 * 3, dtype=np.uint32).reshape(5, 4, 3)
    with h5py.File(tmp_path / "det.h5", "w") as f:  # a detector's own file
        f["data"] = detector_frames
    scan = new_scan(path=str(tmp_path / "scan.h5"))
    num = scan.create_stream("num", "float32", (3,))
    var = scan.create_stream("var", "uint16", (-1, 2))
    js = scan.create_stream("js", encoding="json")
    ref = scan.create_stream("ref", encoding="references")
    frames = scan.create_stream("frames", "uint16", (16, 8), encoding="bslz4")
    started(scan)
    rng = np.random.default_rng(0)
    data = rng.random((7, 3), dtype=np.float32)
    num.send(data[:2])
    num.send(data[2])
    num.send(data[3:])
    var_points = [np.full((n, 2), n, np.uint16) for n in (1, 4, 2)]
    var.send(var_points[:2])
    var.send(var_points[2])
    js.send([{"x": 1}, "two", [3]])
    ref.send([{"file": "det.h5", "dataset": "/data", "index": 4},
              {"file": str(tmp_path / "det.h5"), "dataset": "/data", "index": 1}])
    with pytest.raises(ValueError, match="reference point"):
        ref.send({"file": "/d/f.h5"})
    imgs = rng.integers(0, 50, (5, 16, 8), dtype=np.uint16)
    frames.send_chunks([bslz4.compress(i) for i in imgs[:3]])
    frames.send(imgs[3:])  # arrays are compressed by the library
    with pytest.raises(ValueError, match="chunk 0"):
        frames.send_chunks([b"garbage that is not a chunk"])
    with pytest.raises(ValueError, match="expected 256"):
        frames.send_chunks([bslz4.compress(np.zeros((4, 4), np.uint16))])
    scan.close()
    r = store.load_scan(scan.key).streams
    assert np.array_equal(r["num"][:], data)
    assert r["num"][:].dtype == np.float32
    got_var = r["var"][:]
    assert len(got_var) == 3 and all(np.array_equal(a, b) for a, b in zip(got_var, var_points))
    assert r["js"][:] == [{"x": 1}, "two", [3]]
    # references: readers get the frames (relative files start at the scan file's folder)
    assert np.array_equal(r["ref"][:], detector_frames[[4, 1]])
    assert np.array_equal(r["ref"][1], detector_frames[1])
    cursor = store.load_scan(scan.key).cursor(["ref"])
    assert cursor.read(block=False)["ref"].data[0]["index"] == 4  # cursors: the references
    assert np.array_equal(r["frames"][:], imgs)
    assert np.array_equal(r["frames"][4], imgs[4])


def test_bslz4_frames_use_less_redis_memory(store, new_scan, redis_client):
    scan = new_scan()
    raw = scan.create_stream("raw", "uint16", (256, 256))
    packed = scan.create_stream("packed", "uint16", (256, 256), encoding="bslz4")
    started(scan)
    y, x = np.mgrid[:256, :256]
    frame = np.random.default_rng(1).poisson(10 + 5 * np.sin(x / 20) ** 2, (256, 256))
    frame = frame.astype(np.uint16)
    for _ in range(4):
        raw.send(frame)
        packed.send(frame)
    assert redis_client.memory_usage(packed.key) * 2 < redis_client.memory_usage(raw.key)


# ---- cursors ------------------------------------------------------------------------------

def test_cursor_many_streams_and_end(store, new_scan):
    scan = new_scan()
    streams = [scan.create_stream(f"c{i}", "float64") for i in range(20)]
    started(scan)
    reader = store.load_scan(scan.key)
    cursor = reader.cursor()
    for batch in range(3):
        scan.send_many({s: np.arange(5.0) + 5 * batch for s in streams})
    got = {name: [] for name in reader.streams}
    while len(cursor.ended) < 20:
        views = cursor.read(timeout=0.2)
        for name, view in views.items():
            assert view.index == len(got[name])
            got[name].extend(view.data)
        if not views and scan.state != ScanState.CLOSED:
            scan.close()
    assert all(v == list(np.arange(15.0)) for v in got.values())
    with pytest.raises(EndOfStream):
        cursor.read(timeout=0.1)


def test_cursor_joins_small_numeric_entries_and_keeps_big_ones_whole(store, new_scan):
    scan = new_scan()
    counter = scan.create_stream("ct", "float64")
    spectrum = scan.create_stream("mca", "uint32", (20000,))  # 80 kB a point
    started(scan)
    for i in range(300):  # 300 entries of 10 points: 24 kB
        counter.send(np.arange(10.0) + 10 * i)
    spectra = np.arange(3 * 20000, dtype=np.uint32).reshape(3, 20000)
    spectrum.send(spectra[:1])
    spectrum.send(spectra[1:])
    # another producer writing the fields in another order: read as well
    store.redis.xadd(counter.key, {"n": 2, "d": np.array([-1.0, -2.0]).tobytes()},
                     id=keys.entry_id(3000))
    views = store.load_scan(scan.key).cursor().read(block=False, count=1000)
    ct = views["ct"]
    assert len(ct.parts) == 2 and ct.entry_nbytes == 80  # one joined run, then the other
    assert np.array_equal(ct.data, np.r_[np.arange(3000.0), -1.0, -2.0])
    mca = views["mca"]
    assert [len(p) for p in mca.parts] == [1, 2] and mca.entry_nbytes == 160000
    assert np.array_equal(mca.data, spectra)


def test_watermarks_and_lengths_of_many_streams_in_one_round_trip(store, new_scan):
    from blissdata.exceptions import LeaseLostError
    from blissdata.stream import Stream

    scan = new_scan()
    streams = [scan.create_stream(f"c{i}", "float64") for i in range(3)]
    started(scan)
    for i, s in enumerate(streams):
        s.send(np.arange(float(i + 1)))
    streams[2].seal()
    assert Stream.lengths(streams) == [1, 2, 3] == [len(s) for s in streams]
    store.redis.set(keys.lease_key(scan.key), "w2/bbbb")
    marks = [(s, "/data/a.h5", f"/1.1/{s.name}", i + 1) for i, s in enumerate(streams)]
    with pytest.raises(LeaseLostError, match="watermark of 3 streams not published"):
        Stream.mark_file_backed_all(marks, fence=(keys.lease_key(scan.key), "w1/aaaa"))
    assert all(s.file_backing is None for s in streams)
    Stream.mark_file_backed_all(marks, fence=(keys.lease_key(scan.key), "w2/bbbb"))
    assert [s.file_backing["points"] for s in streams] == [1, 2, 3]


def test_reader_joining_late_and_from_a_position(store, new_scan):
    scan = new_scan()
    s = scan.create_stream("s", "int64")
    started(scan)
    for i in range(10):
        s.send(np.arange(10 * i, 10 * i + 10))
    scan.close()
    reader = store.load_scan(scan.key)
    views = reader.cursor().read(block=False)
    assert np.array_equal(views["s"].data, np.arange(100))
    mid = reader.cursor(start=35).read(block=False)["s"]
    assert mid.index == 35 and np.array_equal(mid.data, np.arange(35, 100))
    assert list(reader.streams["s"]) == list(range(100))


def test_reader_joining_early_blocks(store, new_scan):
    scan = new_scan()
    s = scan.create_stream("s", "float64")
    scan.prepare()
    reader = store.load_scan(scan.key)
    got = []

    def consume():
        got.extend(reader.streams["s"])  # iteration blocks until the seal

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)
    assert got == [] and t.is_alive()
    scan.start()
    for i in range(5):
        s.send(float(i))
        time.sleep(0.02)
    scan.close()
    t.join(10)
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_two_scans_interleaved(store, new_scan):
    a, b = new_scan(number=1), new_scan(number=2)
    sa, sb = a.create_stream("x", "float64"), b.create_stream("x", "float64")
    started(a)
    started(b)
    for i in range(50):
        sa.send(float(i))
        sb.send(float(-i))
    a.close()
    b.close(EndReason.FAILURE)
    ra, rb = store.load_scan(a.key), store.load_scan(b.key)
    assert list(ra.streams["x"][:]) == [float(i) for i in range(50)]
    assert list(rb.streams["x"][:]) == [float(-i) for i in range(50)]
    assert rb.info["end_reason"] == "FAILURE"


def test_unknown_stream_in_cursor(store, new_scan):
    scan = new_scan()
    scan.create_stream("x", "float64")
    with pytest.raises(StreamError, match="no stream"):
        scan.cursor(["y"])
