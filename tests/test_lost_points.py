"""When Redis loses points, the writer loses no more than Redis did, and says so everywhere.

Real processes: a writer process paused (SIGSTOP) while the memory tracker, above its hard
limit, trims points no file holds yet; valkey without persistence killed -9 and started
again empty on the same port mid-scan; the tracker command given a hard limit below what
Redis needs with no data."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import h5py
import numpy as np
import pytest

from blissdata import DataStore, IndexNoMoreThereError, keys, lost_points
from blissdata.archive import open_scan
from blissdata.h5api import File
from blissdata.replay import main as replay_main
from blissdata.memory_tracker import MemoryTracker
from blissdata.redis_server import EmbeddedRedis
from writer.state import status as writer_status
from writer.commands.validate import validate_file
from writer_helpers import durable_points, stop_process, wait_status

MB = 2**20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_writer_process(redis_url, data_root, log_path, metrics_port=None, settings=""):
    command = [sys.executable, "-m", "writer.commands.cli", "run", "--redis", redis_url,
               "--data-root", str(data_root), "--log-level", "INFO"]
    if metrics_port is not None:
        settings += f"\n[metrics]\nenabled = true\nport = {metrics_port}\n"
    if settings:
        config = log_path.with_suffix(".toml")
        config.write_text(settings)
        command += ["--config", str(config)]
    return subprocess.Popen(command, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def wait_durable(store, scan_key, stream, points, log_path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while durable_points(store, scan_key, stream) < points:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def read_entry_status(path, entry="1.1"):
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        raw = f[f"{entry}/writer_status/data"][()]
        return (writer_status.ScanStatus.from_json(raw.decode()),
                f[f"{entry}/end_reason"][()].decode(), f[f"{entry}/end_time"][()].decode())


def test_points_trimmed_before_the_writer_stored_them(store, tmp_path, capsys):
    """The writer is paused while the tracker, above its hard limit, trims points [100, 190)
    that no file holds: the writer records them lost, fills them with the fill value, writes
    every later point, and ends the scan "failed" naming the range: in Redis, the file, its
    log and its metrics. Readers raise for the lost range and read the rest."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    port = free_port()
    proc = start_writer_process(store.url, data_root, log_path, metrics_port=port)
    try:
        time.sleep(1.0)  # the service subscribes
        path = data_root / "lossy.h5"
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "lossy", "type": "ascan", "scan_nb": 1})
        diode = scan.create_stream("diode", "float64")
        cam = scan.create_stream("cam", "uint16", (8, 8))
        scan.prepare()
        scan.start()
        values = np.arange(300, dtype=np.float64)
        frames = (np.arange(300 * 64) % 65521).astype(np.uint16).reshape(300, 8, 8)

        def send(start, stop):
            for i in range(start, stop, 10):
                scan.send_many({diode: values[i:i + 10], cam: frames[i:i + 10]})

        send(0, 100)
        wait_durable(store, scan.key, "diode", 100, log_path)
        wait_durable(store, scan.key, "cam", 100, log_path)
        proc.send_signal(signal.SIGSTOP)  # a writer too slow for the points coming in
        time.sleep(0.3)  # stopped for sure
        try:
            send(100, 200)
            tracker = MemoryTracker(DataStore(store.url), budget_bytes=1, hard_limit_bytes=1)
            tracker.step()  # all but each stream's last entry [190, 200) goes
        finally:
            proc.send_signal(signal.SIGCONT)
        assert tracker.lost_trims == 2 and tracker.lost_points == 180
        send(200, 300)
        scan.stop()
        scan.close()
        st = wait_status(store, scan.key, timeout=30)
        log = log_path.read_text()
        assert st.state == "failed", log
        # the tracker called [100, 190) lost; points the writer had read just before its
        # pause are not: the writer's ranges are the truth (in Redis too, at the end)
        first = st.lost_points["diode"][0][0]
        assert 100 <= first < 190 and st.lost_points == {"diode": [[first, 190]],
                                                         "cam": [[first, 190]]}
        n_lost = 2 * (190 - first)
        assert f"{n_lost} points lost in Redis" in st.error
        assert f"'diode' [{first}, 190)" in st.error
        assert "internal error" not in st.error
        assert st.points == {"diode": 300, "cam": 300}
        # the log: an ERROR per gap naming scan, stream and range
        assert f"scan {scan.key} stream 'diode': points [{first}, 190)" in log
        assert "ERROR" in log and "LOST" in log
        # the file: every point Redis still had; the lost ones hold the fill value
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            got = f["1.1/measurement/diode"][()]
            got_cam = f["1.1/measurement/cam"][()]
        assert len(got) == 300
        assert np.array_equal(got[:first], values[:first])
        assert np.isnan(got[first:190]).all()
        assert np.array_equal(got[190:], values[190:])
        assert np.array_equal(got_cam[190:], frames[190:])
        assert np.array_equal(got_cam[:first], frames[:first])
        note, end_reason, end_time = read_entry_status(path)
        assert note.state == "failed" and note.lost_points == st.lost_points
        assert end_reason == "SUCCESS WITH POINTS LOST" and end_time
        # Redis: exactly the writer's ranges
        assert json.loads(store.redis.hget(keys.lost_key(scan.key), "diode")) == [[first, 190]]
        # readers: live (Redis, then the file), archived (the file alone)
        reader = DataStore(store.url).load_scan(scan.key).streams["diode"]
        with pytest.raises(IndexNoMoreThereError,
                           match=rf"\[150, 160\).*lost.*\[\[{first}, 190\]\]"):
            reader[150:160]
        with pytest.raises(IndexNoMoreThereError, match=rf"\[{first}, 190\]"):
            reader[first - 5:first + 5]
        assert np.array_equal(reader[:first], values[:first])
        assert np.array_equal(reader[190:], values[190:])
        archived = open_scan(str(path))
        try:
            with pytest.raises(IndexNoMoreThereError, match=rf"\[\[{first}, 190\]\]"):
                archived.streams["diode"][189]
            assert np.array_equal(archived.streams["diode"][190:300], values[190:])
            assert np.array_equal(archived.streams["cam"][:100], frames[:100])
        finally:
            archived.close()
        # replay: refused, naming the loss, nothing published
        assert replay_main([str(path), "--redis", store.url]) == 2
        assert f"'diode' [{first}, 190)" in capsys.readouterr().err
        # h5api: live (the Stream API), then from the file once the scan left Redis
        with File(DataStore(store.url), str(path)) as live:
            with pytest.raises(IndexNoMoreThereError, match=rf"\[\[{first}, 190\]\]"):
                live["/1.1/measurement/diode"][150:160]
        store.delete_scan(scan.key)
        with File(DataStore(store.url), str(path)) as archived_file:
            diode_ds = archived_file["/1.1/measurement/diode"]
            with pytest.raises(IndexNoMoreThereError, match=rf"\[\[{first}, 190\]\]"):
                diode_ds[150:160]
            assert np.array_equal(diode_ds[190:300], values[190:])
            assert len(diode_ds) == 300
        # validate: a warning naming the loss, not an error
        report = validate_file(path)
        assert report.ok, report.errors
        assert any(f"{n_lost} points lost" in w and f"'cam' [{first}, 190)" in w
                   for w in report.warnings), report.warnings
        # metrics
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = text.decode()
        assert f"blisswriter_points_lost_total {float(n_lost)}" in text
        assert "blisswriter_gaps_total 2.0" in text
        assert 'blisswriter_scans_finished_total{state="failed"} 1.0' in text
    finally:
        stop_process(proc)


@pytest.mark.parametrize("down_s", [0.0, 3.0])
def test_redis_restarted_empty_mid_scan(tmp_path, down_s):
    """valkey without persistence killed -9 and started again, empty, on the same port (at
    once, or after the writer's lease ran out: it has let go of the file by then): the
    writer ends the entry with the reason, keeps every point it had, and writes the next
    scan in full. Its log does not blame another writer."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    server = EmbeddedRedis().start()
    port = server.port
    proc = None
    try:
        store = DataStore(server.url)
        proc = start_writer_process(server.url, data_root, log_path,
                                    settings="lease_ttl_s = 1.0\n")
        time.sleep(1.0)
        path = data_root / "restart.h5"
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "t", "type": "ascan", "scan_nb": 1})
        diode = scan.create_stream("diode", "float64")
        scan.prepare()
        scan.start()
        diode.send(np.arange(150.0))
        wait_durable(store, scan.key, "diode", 150, log_path)
        server.process.kill()  # -9: no persistence, nothing saved
        server.process.wait()
        server.stop()
        time.sleep(down_s)
        server = EmbeddedRedis(port=port).start()  # as systemd brings it back
        deadline = time.monotonic() + 30
        while True:
            try:  # the writer reopening the file to end the entry: until it is back in
                note, end_reason, end_time = read_entry_status(path)  # SWMR mode, HDF5
            except (OSError, KeyError):  # refuses SWMR readers ("not already open for
                end_reason = ""  # SWMR writing"): an error to retry, never a crash
            if end_reason:
                break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        assert end_reason == "DELETION" and end_time
        assert note.state == "failed"
        assert "scan gone from Redis: deleted, or Redis restarted without its data" in note.error
        # in Redis too (`blisswriter status`), though the scan itself is gone
        st = wait_status(DataStore(server.url), scan.key)
        assert st.state == "failed" and "scan gone from Redis" in st.error
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            assert np.array_equal(f["1.1/measurement/diode"][()], np.arange(150.0))
        # the next scan, in the new Redis, is written in full
        store = DataStore(server.url)
        scan2 = store.create_scan({"session": "s", "name": "ct", "number": 2,
                                   "path": str(data_root / "after.h5")},
                                  info={"title": "ct", "type": "ct", "scan_nb": 2})
        s2 = scan2.create_stream("diode", "float64")
        scan2.prepare()
        scan2.start()
        s2.send(np.arange(20.0))
        scan2.stop()
        scan2.close()
        assert wait_status(store, scan2.key, timeout=30).state == "done", log_path.read_text()
        log = log_path.read_text()
        assert "lost to another writer" not in log
        assert "scan gone from Redis" in log
        assert "internal error" not in log
    finally:
        if proc is not None:
            stop_process(proc)
        server.stop()


def test_tracker_refuses_a_hard_limit_below_what_redis_needs(store):
    """With no scan data Redis uses ~1 MB: a hard limit below it would trim every point of
    every scan before a writer could store it. The command refuses to start."""
    done = subprocess.run([sys.executable, "-m", "blissdata.memory_tracker", "--redis",
                           store.url, "--budget", "0.5", "--hard-limit", "0.5"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--hard-limit" in done.stderr and "with no scan data" in done.stderr


def test_tracker_says_when_redis_is_above_its_hard_limit(store, new_scan, caplog):
    """Above the hard limit because of scan data (trimming can bring it under): an ERROR at
    start, not a refusal."""
    scan = new_scan()
    s = scan.create_stream("x", "float64", (1024,))
    scan.prepare()
    for _ in range(32):
        s.send(np.zeros((8, 1024)))  # 2 MB of points
    tracker = MemoryTracker(store, budget_bytes=1, hard_limit_bytes=store.used_memory() - MB)
    with caplog.at_level("ERROR", logger="blissdata.memory_tracker"):
        assert tracker.check_hard_limit() is None
    assert "above the hard limit" in caplog.text and "LOST" in caplog.text
    assert tracker.memory_without_scan_data() < store.used_memory() - MB


def test_lost_ranges_merge_in_redis_and_coarsen_in_the_file(redis_client):
    key = keys.scan_key("lost-ranges")
    for start, stop in ([10, 20], [30, 40], [20, 25], [35, 50], [100, 101]):
        lost_points.record(redis_client, key, "x", start, stop)
    assert json.loads(redis_client.hget(keys.lost_key(key), "x")) == [[10, 25], [30, 50],
                                                                       [100, 101]]
    many = [[i * 10, i * 10 + 1] for i in range(5000)]
    coarse = lost_points.coarsened(many, 8)
    assert len(coarse) == 8 and coarse[0][0] == 0 and coarse[-1][1] == 49991
    assert all(lost_points.overlapping(coarse, a, b) for a, b in many)  # none left out
    redis_client.delete(keys.lost_key(key))


def test_many_lost_ranges_still_fit_the_status_note(tmp_path):
    """The writer_status note has a fixed size (SWMR): many lost ranges are joined into
    fewer, wider ones, never dropped."""
    status = writer_status.ScanStatus("blissdata:scan:{x}", state="failed",
                                      lost_points={"x": [[i * 10, i * 10 + 1]
                                                         for i in range(5000)]})
    with h5py.File(tmp_path / "n.h5", "w") as f:
        entry = f.create_group("1.1")
        writer_status.write_note(entry, status)
        stored = lost_points.recorded_in(entry)
    assert stored["x"][0][0] == 0 and stored["x"][-1][1] == 49991
    assert all(lost_points.overlapping(stored["x"], a, b) for a, b in status.lost_points["x"])


def test_tracker_process_counts_and_logs_every_trim_of_unwritten_points(tmp_path):
    """The tracker command above its hard limit with points no writer stored: an ERROR at
    start, an ERROR per trim naming scan, stream and range, and the counts in its metrics."""
    port = free_port()
    with EmbeddedRedis() as server:
        store = DataStore(server.url)
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(tmp_path / "never.h5")},
                                 info={"title": "t", "type": "ascan", "scan_nb": 1})
        s = scan.create_stream("x", "float64", (1024,))
        scan.prepare()
        for _ in range(64):
            s.send(np.zeros((8, 1024)))  # 4 MB of points, no writer: no watermark
        log_path = tmp_path / "tracker.log"
        proc = subprocess.Popen([sys.executable, "-m", "blissdata.memory_tracker", "--redis",
                                 server.url, "--budget", "1.5", "--hard-limit", "2",
                                 "--interval", "0.1", "--metrics-port", str(port)],
                                stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while not store.redis.hget(keys.lost_key(scan.key), "x"):
                assert time.monotonic() < deadline and proc.poll() is None, \
                    log_path.read_text()
                time.sleep(0.1)
            lost = json.loads(store.redis.hget(keys.lost_key(scan.key), "x"))
            assert lost[0][0] == 0
            def metrics():
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                              timeout=5).read().decode()
                return dict(line.rsplit(" ", 1) for line in text.splitlines()
                            if line and not line.startswith("#"))

            values = metrics()
            while float(values["blissdata_tracker_lost_trims_total"]) < 1:  # just counted
                assert time.monotonic() < deadline, values
                time.sleep(0.1)
                values = metrics()
            assert float(values["blissdata_tracker_lost_trims_total"]) == 1
            assert float(values["blissdata_tracker_lost_points_total"]) == lost[0][1]
            assert float(values["blissdata_tracker_hard_limit_bytes"]) == 2 * MB
            log = log_path.read_text()
            assert "above the hard limit" in log  # said at start
            assert f"scan {scan.key} stream 'x' points [0, {lost[0][1]})" in log
        finally:
            stop_process(proc)


def test_writer_killed_after_a_gap_resumes_with_it(store, tmp_path):
    """A writer killed -9 after it filled a gap: the one restarted resumes from the file,
    keeps the lost range in its status, and ends the scan failed naming it."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    proc = start_writer_process(store.url, data_root, log_path)
    try:
        time.sleep(1.0)
        path = data_root / "resumed.h5"
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "t", "type": "ascan", "scan_nb": 1})
        diode = scan.create_stream("diode", "float64")
        scan.prepare()
        scan.start()
        values = np.arange(300, dtype=np.float64)
        for i in range(0, 100, 10):
            diode.send(values[i:i + 10])
        wait_durable(store, scan.key, "diode", 100, log_path)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        try:
            for i in range(100, 200, 10):
                diode.send(values[i:i + 10])
            MemoryTracker(DataStore(store.url), budget_bytes=1, hard_limit_bytes=1).step()
        finally:
            proc.send_signal(signal.SIGCONT)
        wait_durable(store, scan.key, "diode", 200, log_path)  # the gap filled and flushed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for i in range(200, 300, 10):
            diode.send(values[i:i + 10])
        scan.stop()
        scan.close()
        proc = start_writer_process(store.url, data_root, log_path)
        st = wait_status(store, scan.key, timeout=30)
        first = st.lost_points["diode"][0][0]
        assert st.state == "failed" and st.lost_points == {"diode": [[first, 190]]}, \
            log_path.read_text()
        assert "resumed after a writer restart" in st.warnings
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            got = f["1.1/measurement/diode"][()]
        assert np.array_equal(got[:first], values[:first]) and np.isnan(got[first:190]).all()
        assert np.array_equal(got[190:], values[190:])
        assert read_entry_status(path)[1] == "SUCCESS WITH POINTS LOST"
    finally:
        stop_process(proc)
