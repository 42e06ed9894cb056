"""Real writer processes killed (-9) mid-scan and restarted: no point lost, none doubled."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from blissdata import EndReason
from writer_helpers import durable_points, stop_process, wait_status


def start_writer_process(redis_url, data_root, log_path):
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "writer.commands.cli", "run", "--redis", redis_url,
         "--data-root", str(data_root), "--log-level", "DEBUG"],
        stdout=log, stderr=subprocess.STDOUT)


def test_kill_9_mid_scan_then_restart(store, tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    proc = start_writer_process(store.url, data_root, log_path)
    try:
        time.sleep(1.0)  # the service subscribes
        path = data_root / "crash.h5"
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "crash test", "type": "ascan", "scan_nb": 1})
        diode = scan.create_stream("diode", "float64")
        cam = scan.create_stream("cam", "uint16", (32, 32))
        scan.prepare()
        scan.start()
        values = np.arange(3000, dtype=np.float64)
        frames = (np.arange(300 * 32 * 32) % 65521).astype(np.uint16).reshape(300, 32, 32)
        for i in range(0, 1500, 100):
            scan.send_many({diode: values[i:i + 100], cam: frames[i // 10:i // 10 + 10]})
        deadline = time.monotonic() + 15
        while durable_points(store, scan.key, "diode") < 1500:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the producer goes on while no writer runs
        for i in range(1500, 3000, 100):
            scan.send_many({diode: values[i:i + 100], cam: frames[i // 10:i // 10 + 10]})
        scan.stop()
        scan.close(EndReason.SUCCESS)
        # a scan created while the writer is down is written too
        path2 = data_root / "while-down.h5"
        scan2 = store.create_scan({"session": "s", "name": "ct", "number": 2,
                                   "path": str(path2)},
                                  info={"title": "ct", "type": "ct", "scan_nb": 2})
        s2 = scan2.create_stream("diode", "float64")
        scan2.prepare()
        scan2.start()
        s2.send(np.arange(5.0))
        scan2.close()
        proc = start_writer_process(store.url, data_root, log_path)
        st = wait_status(store, scan.key, timeout=30)
        assert st.state == "done", (st.error, log_path.read_text())
        assert "resumed after a writer restart" in st.warnings
        assert wait_status(store, scan2.key, timeout=30).state == "done"
        with h5py.File(path, "r", locking=False) as f:
            assert np.array_equal(f["1.1/measurement/diode"][()], values)
            assert np.array_equal(f["1.1/measurement/cam"][()], frames)
            assert f["1.1/end_reason"][()].decode() == "SUCCESS"
        with h5py.File(path2, "r", locking=False) as f:
            assert np.array_equal(f["2.1/measurement/diode"][()], np.arange(5.0))
    finally:
        stop_process(proc)


def test_killed_again_and_again_while_points_arrive(store, tmp_path):
    """A slow producer (the last chunk of each stream is flushed partially and rewritten
    at every flush) and a writer killed -9 at random moments three times, restarted each
    time: the file ends with every point once, in order."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    rng = np.random.default_rng(7)
    path = data_root / "kills.h5"
    scan = store.create_scan({"session": "s", "name": "ascan", "number": 1, "path": str(path)},
                             info={"title": "killed", "type": "ascan", "scan_nb": 1})
    diode = scan.create_stream("diode", "float64")
    cam = scan.create_stream("cam", "uint16", (32, 32))
    scan.prepare()
    scan.start()
    values = rng.random(1200)
    frames = rng.poisson(30, (1200, 32, 32)).astype(np.uint16)
    proc = start_writer_process(store.url, data_root, log_path)
    try:
        sent = 0
        for _kill in range(3):
            until = time.monotonic() + rng.uniform(1.0, 2.0)
            while time.monotonic() < until and sent < 1200:
                scan.send_many({diode: values[sent:sent + 10], cam: frames[sent:sent + 10]})
                sent += 10
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = start_writer_process(store.url, data_root, log_path)
        while sent < 1200:
            scan.send_many({diode: values[sent:sent + 10], cam: frames[sent:sent + 10]})
            sent += 10
        scan.stop()
        scan.close(EndReason.SUCCESS)
        st = wait_status(store, scan.key, timeout=60)
        assert st.state == "done", (st.error, log_path.read_text()[-5000:])
        with h5py.File(path, "r", locking=False) as f:
            np.testing.assert_array_equal(f["1.1/measurement/diode"][()], values)
            np.testing.assert_array_equal(f["1.1/measurement/cam"][()], frames)
    finally:
        stop_process(proc)


def test_references_stream_resumes_from_its_own_file_after_kill_9(store, tmp_path):
    """A references stream's virtual dataset lives in a file of its own (docs/files.md):
    after kill -9 the writer resumes from it; every frame once, the file valid NeXus."""
    from writer.commands.validate import validate_file

    data_root = tmp_path / "data"
    data_root.mkdir()
    log_path = tmp_path / "writer.log"
    frames = (np.arange(60 * 8 * 8) % 65521).astype(np.uint16).reshape(60, 8, 8)
    for k in range(6):  # the detector's own files, 10 frames each
        with h5py.File(data_root / f"det_{k}.h5", "w") as f:
            f["data"] = frames[k * 10:(k + 1) * 10]
    proc = start_writer_process(store.url, data_root, log_path)
    try:
        time.sleep(1.0)  # the service subscribes
        path = data_root / "refs.h5"
        scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "refs", "type": "ascan", "scan_nb": 1})
        # (the diode first: an inferred default plot of references gets "@axes" wrong, as
        # their rank is unknown when the entry is made)
        diode = scan.create_stream("diode", "float64")
        ref = scan.create_stream("det:image", encoding="references")
        scan.prepare()
        scan.start()

        def send(a, b):
            for i in range(a, b):
                scan.send_many({ref: {"file": f"det_{i // 10}.h5", "dataset": "/data",
                                      "index": i % 10}, diode: float(i)})
        send(0, 30)
        deadline = time.monotonic() + 15
        while durable_points(store, scan.key, "det:image") < 30:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        send(30, 60)  # the producer goes on while no writer runs
        scan.stop()
        scan.close(EndReason.SUCCESS)
        proc = start_writer_process(store.url, data_root, log_path)
        st = wait_status(store, scan.key, timeout=30)
        assert st.state == "done", (st.error, log_path.read_text())
    finally:
        stop_process(proc)
    own = data_root / "refs" / "refs_1.1_det_image.h5"
    with h5py.File(path, "r", locking=False) as f:
        link = f["1.1"].get("measurement/det_image", getlink=True)
        assert isinstance(link, h5py.ExternalLink) and link.filename == str(own)
        assert np.array_equal(f["1.1/measurement/det_image"][()], frames)
        assert np.array_equal(f["1.1/measurement/diode"][()], np.arange(60.0))
    assert not [p for p in own.parent.iterdir() if p.name.endswith(".tmp")]
    assert validate_file(path).ok
