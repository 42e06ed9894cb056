"""Memory tracker with a real Redis given a small maxmemory, the real writer, readers that
switch to the file without noticing."""

import json
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings, strategies as st

from blissdata import DataStore, IndexNoMoreThereError, keys
from blissdata.file_backing import DataFileError
from blissdata.memory_tracker import MemoryTracker, main as tracker_main
from blissdata.redis_server import EmbeddedRedis
from writer_helpers import start_writer, wait_status

MB = 2**20


@pytest.fixture
def small_redis():
    with EmbeddedRedis(maxmemory=48 * MB) as server:
        yield server.url


def run_tracker(tracker):
    thread = threading.Thread(target=tracker.run, daemon=True)
    thread.start()
    return thread


def test_scan_larger_than_redis_is_written_and_read_back(small_redis, tmp_path):
    store = DataStore(small_redis, full_timeout_s=120)
    root = tmp_path / "data"
    root.mkdir()
    service, writer_thread = start_writer(small_redis, root, max_lag_s=0.2)
    # hard limit above maxmemory: nothing unwritten is ever trimmed; when Redis is full
    # the producer waits for the writer and the tracker
    tracker = MemoryTracker(DataStore(small_redis), budget_bytes=16 * MB,
                            hard_limit_bytes=64 * MB, interval_s=0.05)
    tracker_thread = run_tracker(tracker)
    try:
        time.sleep(0.2)
        n, shape = 800, (256, 256)  # 100 MB of frames through a 48 MB Redis
        rng = np.random.default_rng(0)
        base = rng.poisson(30, (8, *shape)).astype(np.uint16)
        scan = store.create_scan({"session": "s", "name": "timescan", "number": 1,
                                  "path": str(root / "big.h5")},
                                 info={"title": "big", "type": "timescan", "scan_nb": 1})
        cam = scan.create_stream("cam", "uint16", shape)
        diode = scan.create_stream("diode", "float64")
        scan.prepare()
        scan.start()
        for i in range(0, n, 8):
            frames = base + np.uint16(i % 1000)
            scan.send_many({cam: frames, diode: np.arange(i, i + 8, dtype=float)})
        scan.close()
        assert wait_status(store, scan.key, timeout=120).state == "done"
        assert store.redis.xrange(cam.key, "-", "+", count=1)[0][0] != b"0-1", "never trimmed"
        reader = DataStore(small_redis).load_scan(scan.key)
        got = reader.streams["cam"][:]  # from the file (trimmed) and Redis (recent)
        assert got.shape == (n, *shape) and got.dtype == np.uint16
        for i in range(0, n, 8):
            assert np.array_equal(got[i:i + 8], base + np.uint16(i % 1000)), i
        assert np.array_equal(reader.streams["diode"][:], np.arange(n, dtype=float))
        assert np.array_equal(reader.streams["cam"][5], base[5])
        views, cursor = {}, reader.cursor(["diode"])
        while "diode" not in cursor.ended:
            for name, view in cursor.read(timeout=0.5).items():
                views.setdefault(name, []).extend(view.data)
        assert views["diode"] == list(np.arange(n, dtype=float))
        assert not store.redis.hgetall(keys.lost_key(scan.key))  # nothing lost
    finally:
        tracker.stop()
        service.stop()
        tracker_thread.join(10)
        writer_thread.join(30)


def test_tracker_killed_and_restarted_mid_scan(small_redis, tmp_path):
    """A tracker process killed -9 while a scan larger than Redis runs: the producer waits
    (Redis full), a new tracker process picks up from what Redis holds, nothing is lost."""
    store = DataStore(small_redis, full_timeout_s=120)
    root = tmp_path / "data"
    root.mkdir()
    service, writer_thread = start_writer(small_redis, root, max_lag_s=0.2)
    command = [sys.executable, "-m", "blissdata.memory_tracker", "--redis", small_redis,
               "--budget", "16", "--hard-limit", "64", "--interval", "0.05"]
    trackers = [subprocess.Popen(command, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(0.5)
        n, shape = 480, (256, 256)  # 60 MB through a 48 MB Redis
        base = np.random.default_rng(1).poisson(30, (8, *shape)).astype(np.uint16)
        scan = store.create_scan({"session": "s", "name": "timescan", "number": 1,
                                  "path": str(root / "restart.h5")},
                                 info={"title": "t", "type": "timescan", "scan_nb": 1})
        cam = scan.create_stream("cam", "uint16", shape)
        scan.prepare()
        scan.start()
        for i in range(0, n, 8):
            if i == n // 3:
                trackers[0].send_signal(signal.SIGKILL)
                trackers[0].wait()
                # restarted after a while, from another process, while the producer waits
                threading.Timer(1.0, lambda: trackers.append(
                    subprocess.Popen(command, stderr=subprocess.DEVNULL))).start()
            cam.send(base + np.uint16(i))
        scan.close()
        assert wait_status(store, scan.key, timeout=120).state == "done"
        got = DataStore(small_redis).load_scan(scan.key).streams["cam"][:]
        assert got.shape == (n, *shape)
        for i in range(0, n, 8):
            assert np.array_equal(got[i:i + 8], base + np.uint16(i)), i
        assert store.redis.xrange(cam.key, "-", "+", count=1)[0][0] != b"0-1", "never trimmed"
        assert not store.redis.hgetall(keys.lost_key(scan.key))
    finally:
        time.sleep(1.1)  # the restart may still be due
        for proc in trackers:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
        service.stop()
        writer_thread.join(30)


def test_watermark_gets_in_while_redis_is_full(small_redis):
    """The durable watermark is what lets the tracker make room: it is published even when
    Redis refuses every other write (a script flagged allow-oom)."""
    store = DataStore(small_redis)
    assert store.script_flags()  # Valkey here; Redis < 7 gets the plain script
    scan = store.create_scan({"session": "s", "name": "ct", "number": 1, "path": "/tmp/x.h5"},
                             info={"title": "t", "type": "ct", "scan_nb": 1})
    stream = scan.create_stream("diode", "float64")
    scan.prepare()
    scan.start()
    stream.send(np.arange(300_000.0))  # 2.4 MB: enough to set maxmemory 1 MB below it
    store.redis.config_set("maxmemory", store.redis.info("memory")["used_memory"] - MB)
    try:
        with pytest.raises(redis.OutOfMemoryError):
            store.redis.set("probe", 1)
        assert stream.mark_file_backed("/tmp/x.h5", "/1.1/measurement/diode", 10) == 10
        assert stream.file_backing["points"] == 10
    finally:
        store.redis.config_set("maxmemory", 48 * MB)


def test_tracker_and_writer_start_while_redis_is_full(small_redis, tmp_path):
    """Redis over maxmemory (it refuses every write), no tracker and no writer running: both
    start anyway (starting must not need a write), and together they make room again for
    the producer, which waits meanwhile."""
    store = DataStore(small_redis)
    root = tmp_path / "data"
    root.mkdir()
    scan = store.create_scan({"session": "s", "name": "timescan", "number": 1,
                              "path": str(root / "full.h5")},
                             info={"title": "t", "type": "timescan", "scan_nb": 1})
    cam = scan.create_stream("cam", "uint16", (256, 256))
    scan.prepare()
    scan.start()
    frames = np.random.default_rng(4).poisson(30, (8, 256, 256)).astype(np.uint16)
    for _ in range(3):
        cam.send(frames)
    used = store.redis.info("memory")["used_memory"]
    store.redis.config_set("maxmemory", used - MB)  # full: every write is refused now
    with pytest.raises(redis.OutOfMemoryError):
        store.redis.set("probe", 1)
    producer = threading.Thread(target=cam.send, args=(frames,))  # waits for room
    producer.start()
    command = [sys.executable, "-m", "blissdata.memory_tracker", "--redis", small_redis,
               "--budget", "16", "--hard-limit", "64", "--interval", "0.05",
               "--log-level", "debug"]
    # its log to a file: an unread pipe fills up (a line per round at 0.05 s) and blocks it
    tracker_log = tmp_path / "tracker.log"
    with open(tracker_log, "wb") as log_file:
        tracker = subprocess.Popen(command, stderr=log_file)
    service, writer_thread = start_writer(small_redis, root, max_lag_s=0.2)
    try:
        time.sleep(2.0)
        assert tracker.poll() is None, tracker_log.read_text()[-2000:]
        store.redis.config_set("maxmemory", 48 * MB)
        producer.join(60)
        assert not producer.is_alive()
        scan.close()
        assert wait_status(store, scan.key, timeout=60).state == "done"
        got = DataStore(small_redis).load_scan(scan.key).streams["cam"][:]
        assert got.shape == (32, 256, 256)
        for i in range(4):
            assert np.array_equal(got[8 * i:8 * i + 8], frames)
    finally:
        tracker.terminate()
        try:
            tracker.wait(10)
        except subprocess.TimeoutExpired:  # it should stop on SIGTERM: say what it was doing
            tracker.kill()
            raise AssertionError("the tracker did not stop within 10 s of SIGTERM:\n"
                                 + tracker_log.read_text()[-3000:]) from None
        finally:
            service.stop()
            writer_thread.join(30)


def _scan_with_points(store, path, n=100, batch=10):
    scan = store.create_scan({"session": "s", "name": "ascan", "number": 1, "path": str(path)},
                             info={"title": "t", "type": "ascan", "scan_nb": 1})
    s = scan.create_stream("x", "float64")
    scan.prepare()
    scan.start()
    for i in range(0, n, batch):
        s.send(np.arange(i, i + batch, dtype=float))
    return scan, s


def _write_file(path, stream, upto):
    with h5py.File(path, "a") as f:
        if "x" in f:
            del f["x"]
        f["x"] = np.arange(upto, dtype=float)
    stream.mark_file_backed(str(path), "/x", upto)


def test_never_trims_above_the_watermark(store, tmp_path):
    scan, s = _scan_with_points(store, tmp_path / "a.h5")
    _write_file(tmp_path / "file.h5", s, 35)
    tracker = MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40)  # over budget
    tracker.step()
    first = keys.first_index(store.redis.xrange(s.key, "-", "+", count=1)[0][0])
    assert first == 30  # entry [30, 40) holds points >= 35: kept
    assert np.array_equal(s[:], np.arange(100.0))
    tracker.step()  # restarted or not, the same decision
    assert keys.first_index(store.redis.xrange(s.key, "-", "+", count=1)[0][0]) == 30


def test_hard_limit_trims_and_records_the_loss(store, tmp_path, caplog):
    scan, s = _scan_with_points(store, tmp_path / "a.h5")
    _write_file(tmp_path / "file.h5", s, 20)
    tracker = MemoryTracker(store, budget_bytes=1, hard_limit_bytes=1)
    with caplog.at_level("ERROR"):
        tracker.step()
    lost = json.loads(store.redis.hget(keys.lost_key(scan.key), "x"))
    assert lost == [[20, 90]]  # the last entry [90, 100) stays
    assert "LOST" in caplog.text and "[20, 90)" in caplog.text
    assert np.array_equal(s[0:20], np.arange(20.0))  # from the file
    assert np.array_equal(s[90:], np.arange(90.0, 100.0))  # from Redis
    with pytest.raises(IndexNoMoreThereError, match=r"\[10, 50\).*lost.*\[\[20, 90\]\]"):
        s[10:50]


def test_unsaved_scans_trim_freely_and_unwritten_ones_wait(store, tmp_path):
    kept, ks = _scan_with_points(store, tmp_path / "a.h5")
    free = store.create_scan({"session": "s", "name": "ct", "number": 2, "path": "/x"},
                             info={"title": "t", "type": "ct", "scan_nb": 2, "save": False})
    fs = free.create_stream("x", "float64")
    free.prepare()
    fs.send(np.arange(50.0))
    fs.send(np.arange(50.0))
    MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()
    assert store.redis.xlen(ks.key) == 10  # no watermark: nothing trimmed below the hard limit
    assert store.redis.xlen(fs.key) == 1  # only its last entry
    with pytest.raises(IndexNoMoreThereError, match="no file holds this stream"):
        fs[0]


def test_file_deleted_or_moved(store, tmp_path):
    scan, s = _scan_with_points(store, tmp_path / "a.h5")
    _write_file(tmp_path / "file.h5", s, 50)
    MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()
    (tmp_path / "file.h5").rename(tmp_path / "moved.h5")
    fresh = DataStore(store.url).load_scan(scan.key).streams["x"]
    with pytest.raises(DataFileError, match="file.h5"):
        fresh[0:10]


def test_closed_scans_expire_and_inactive_ones_go(store, tmp_path):
    closed, _ = _scan_with_points(store, tmp_path / "a.h5")
    closed.close()
    stuck, _ = _scan_with_points(store, tmp_path / "b.h5")
    tracker = MemoryTracker(store, budget_bytes=2**40, closed_ttl_s=0.5, inactive_ttl_s=0.3)
    tracker.step()
    assert 0 < store.redis.ttl(closed.key) <= 1
    time.sleep(0.4)
    tracker.step()
    assert not store.redis.exists(stuck.key)  # inactive: deleted
    time.sleep(0.8)
    tracker.step()
    assert not store.redis.exists(closed.key)
    assert store.search_scans() == []


def test_tracker_cli_bad_redis(capsys):
    assert tracker_main(["--redis", "redis://127.0.0.1:1"]) == 1
    assert "redis://127.0.0.1:1" in capsys.readouterr().err


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.integers(1, 17), min_size=1, max_size=12),
       trims=st.lists(st.tuples(st.integers(0, 11), st.floats(0, 1)), max_size=8),
       reads=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=6))
def test_random_trims_never_change_what_readers_get(store, tmp_path, batches, trims, reads):
    """A scan written by batches; after some batches a 'writer' makes a prefix durable in a
    file and the tracker trims; every read of any range equals the source."""
    store.redis.flushall()
    store._check_protocol()
    scan = store.create_scan({"session": "s", "name": "p", "number": 1,
                              "path": str(tmp_path / "p.h5")},
                             info={"title": "p", "type": "p", "scan_nb": 1})
    s = scan.create_stream("x", "int64")
    scan.prepare()
    reader = DataStore(store.url).load_scan(scan.key).streams["x"]
    total, durable = 0, 0
    for k, size in enumerate(batches):
        s.send(np.arange(total, total + size))
        total += size
        for when, fraction in trims:
            if when == k and int(total * fraction) > durable:
                durable = int(total * fraction)
                # a new file each time: the reader may hold the previous one open
                _write_file(tmp_path / f"p{time.monotonic_ns()}.h5", s, durable)
                MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()
        for a, b in reads:
            lo, hi = sorted((int(a * total), int(b * total)))
            assert list(reader[lo:hi + 1]) == list(range(lo, min(hi + 1, total)))
    scan.close()
    assert list(reader[:]) == list(range(total))


@pytest.mark.parametrize("args, message", [
    (["--budget", "-5"], "--budget -5: must be > 0 MB"),
    (["--budget", "0"], "--budget 0: must be > 0 MB"),
    (["--budget", "100", "--hard-limit", "50"], "--hard-limit 50 MB is below --budget 100 MB"),
    (["--hard-limit", "0"], "--hard-limit 0 MB is below --budget 1024 MB"),
    (["--inactive-ttl", "0"], "--inactive-ttl 0: must be at least 60 s"),
    (["--inactive-ttl", "5"], "--inactive-ttl 5: must be at least 60 s"),
    (["--closed-ttl", "-1"], "--closed-ttl -1: must be at least 60 s"),
    (["--closed-ttl", "nan"], "--closed-ttl nan: must be at least 60 s"),
    (["--interval", "0"], "--interval 0: must be > 0 s"),
])
def test_tracker_cli_refuses_settings_that_destroy_data(args, message, capsys):
    """Refused before connecting (this URL has no server): nothing runs."""
    with pytest.raises(SystemExit) as exit_:
        tracker_main(["--redis", "redis://127.0.0.1:1", *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_tracker_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        tracker_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: REDIS_URL, then redis://127.0.0.1:6379)", "(default: 1024)",
                    "(default: 1.5 x budget)", "(default: 604800 = 7 days)",
                    "(default: 86400 = 1 day)", "(default: 1)", "(default: INFO)"):
        assert default in text


@pytest.mark.parametrize("kwargs, message", [
    ({"budget_bytes": -5}, "budget must be > 0"),
    ({"budget_bytes": 100, "hard_limit_bytes": 50}, "must not be below the budget"),
    ({"inactive_ttl_s": 0}, "inactive TTL must be > 0 s"),
    ({"closed_ttl_s": -1}, "closed TTL must be > 0 s"),
    ({"interval_s": 0}, "interval must be > 0 s"),
])
def test_tracker_api_refuses_settings_that_destroy_data(store, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MemoryTracker(store, **kwargs)
