"""`json` streams in the writer's files (blissdata/json_points.py): written in SWMR mode, the
same Python values for every reader (Stream API on trimmed points, h5api, open_scan, replay,
rewrite, plain h5py with the documented recipe), files of older writers (variable-length
strings) still read, a writer killed -9 resumes without a point lost or doubled, bad points
met as before."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from blissdata import EndReason
from blissdata.archive import open_scan
from blissdata.h5api import File
from blissdata.json_points import text_dataset
from writer.scan import scan_writer
from writer.commands.rewrite import rewrite
from writer.hdf5.text_appender import TextAppender
from writer_helpers import durable_points, start_writer, stop_process, wait_status


def point(i: int):
    """Point i of the json streams of these tests: JSON values of every kind and size."""
    kind = i % 6
    if kind == 0:
        return {"i": i, "name": f"pt{i}", "values": list(range(i % 5)), "ok": i % 2 == 0}
    if kind == 1:
        return f"texte n°{i} \u00e9\u4e2d\U0001F600"  # beyond ASCII, and a surrogate pair
    if kind == 2:
        return [i, i * 0.5, None, {"nested": [True, False]}]
    if kind == 3:
        return i * 1.25
    if kind == 4:
        return "x" * (3000 + i)  # longer than most
    return None


def read_recipe(path, dataset: str) -> list:
    """docs/files.md's recipe for a json stream with plain h5py."""
    with h5py.File(path, "r", swmr=True, locking=False) as f:
        rows = f[dataset]                    # [start, stop) of each point's text
        text = f[rows.attrs["json_text"]]    # the texts (UTF-8), one after another
        rows.refresh()                       # the rows first, then the texts
        text.refresh()
        r = rows[:rows.shape[0]]
        blob = text[:text.shape[0]].tobytes()
        return [json.loads(blob[a:b]) for a, b in r if 0 <= a <= b <= len(blob)]


def _superblock_version(path) -> int:
    with open(path, "rb") as fh:
        return fh.read(9)[8]


def _json_scan(store, path, number=1, npoints=None):
    info = {"title": "json", "type": "timescan", "scan_nb": number}
    if npoints:
        info["npoints"] = npoints
    scan = store.create_scan({"session": "js", "name": "timescan", "number": number,
                              "path": str(path)}, info=info)
    log = scan.create_stream("log", encoding="json")
    diode = scan.create_stream("diode", "float64")
    scan.prepare()
    scan.start()
    return scan, log, diode


@pytest.fixture
def writer(store, data_root):
    service, thread = start_writer(store.url, data_root, max_lag_s=0.1)
    yield service
    service.stop()
    thread.join(10)


def test_json_points_read_back_by_every_reader(store, writer, data_root, tmp_path):
    path = data_root / "js" / "js.h5"
    scan, log, diode = _json_scan(store, path)
    points = [point(i) for i in range(400)]
    for i in range(0, 400, 37):
        scan.send_many({log: points[i:i + 37], diode: np.arange(i, min(400, i + 37)) * 1.0})
    deadline = time.monotonic() + 20
    while durable_points(store, scan.key, "log") < 400:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    store.redis.xtrim(scan.streams["log"].key, maxlen=1, approximate=False)
    # trimmed points come from the file, written in SWMR mode, while the scan runs
    st = store.load_scan(scan.key).streams["log"]
    assert st[:] == points
    assert st[5] == points[5] and st[4] == points[4] and st[399] == points[399]
    assert st[100:107] == points[100:107]
    with File(store, str(path)) as api:
        assert api["/measurement/log"][10:20] == points[10:20]
    scan_file = data_root / "js" / "js" / "js_1.1.h5"
    assert _superblock_version(scan_file) == 3
    assert read_recipe(path, "1.1/measurement/log") == points
    scan.stop()
    scan.close()
    assert wait_status(store, scan.key, timeout=30).state == "done"
    with open_scan(str(path)) as archived:
        a = archived.streams["log"]
        assert len(a) == 400 and a[:] == points and a[3] == points[3]
        assert [p for v in archived.cursor(["log"]).read().values() for p in v.data] == points
    assert read_recipe(path, "1.1/measurement/log") == points
    with h5py.File(path, "r", locking=False) as f:  # (this process reads it without)
        rows = f["1.1/measurement/log"]
        text = text_dataset(rows)
        assert rows.dtype == np.int64 and rows.shape == (400, 2)
        assert text.name == "/1.1/measurement/log_json_text"
        assert text.shape[0] == rows[-1, 1]  # nothing after the last text
    # rewrite keeps the layout and the values; the file stays valid NeXus
    out = tmp_path / "rewritten.h5"
    rewrite(str(scan_file), str(out), compression="gzip")
    with open_scan(str(out)) as archived:
        assert archived.streams["log"][:] == points
    # valid NeXus (another process: the writer and readers of this one share the file)
    check = subprocess.run(
        [sys.executable, "-c", "import sys; from writer.commands.validate import validate_file; "
         "print(validate_file(sys.argv[1]).errors)", str(out)],
        capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "[]", check.stdout + check.stderr


def test_json_stream_replayed(store, writer, data_root):
    from blissdata.replay import replay

    path = data_root / "rp" / "rp.h5"
    scan, log, diode = _json_scan(store, path)
    points = [point(i) for i in range(30)]
    scan.send_many({log: points, diode: np.arange(30.0)})
    scan.stop()
    scan.close()
    assert wait_status(store, scan.key, timeout=30).state == "done"
    with open_scan(str(path)) as archived:
        again = replay(store, archived, number=2, path=str(data_root / "rp" / "again.h5"))
    assert store.load_scan(again.key).streams["log"][:] == points
    assert wait_status(store, again.key, timeout=30).state == "done"
    with open_scan(str(data_root / "rp" / "again.h5")) as archived:
        assert archived.streams["log"][:] == points


def test_files_of_older_writers_json_as_strings_still_read(store, writer, data_root,
                                                           monkeypatch):
    """Before this layout, json points were variable-length strings: read the same."""
    monkeypatch.setattr(scan_writer.ScanWriter, "json_appender", TextAppender)
    path = data_root / "old" / "old.h5"
    scan, log, diode = _json_scan(store, path)
    points = [point(i) for i in range(50)]
    scan.send_many({log: points, diode: np.arange(50.0)})
    deadline = time.monotonic() + 20
    while durable_points(store, scan.key, "log") < 50:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    store.redis.xtrim(scan.streams["log"].key, maxlen=1, approximate=False)
    assert store.load_scan(scan.key).streams["log"][0:50] == points
    scan.stop()
    scan.close()
    assert wait_status(store, scan.key, timeout=30).state == "done"
    with h5py.File(path, "r") as f:
        assert f["1.1/measurement/log"].dtype.kind == "O"  # the old layout indeed
    with open_scan(str(path)) as archived:
        assert archived.streams["log"][:] == points


def _writer_process(store, data_root, log_path):
    return subprocess.Popen(
        [sys.executable, "-m", "writer.commands.cli", "run", "--redis", store.url,
         "--data-root", str(data_root), "--log-level", "DEBUG"],
        stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def test_json_stream_after_kill_9_has_every_point_once(store, data_root, tmp_path):
    log_path = tmp_path / "writer.log"
    proc = _writer_process(store, data_root, log_path)
    try:
        time.sleep(1.0)  # the service subscribes
        path = data_root / "crash.h5"
        scan, log, diode = _json_scan(store, path)
        points = [point(i) for i in range(600)]
        for i in range(0, 300, 20):
            scan.send_many({log: points[i:i + 20], diode: np.arange(i, i + 20) * 1.0})
        deadline = time.monotonic() + 20
        while durable_points(store, scan.key, "log") < 300:
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for i in range(300, 600, 20):  # the producer goes on while no writer runs
            scan.send_many({log: points[i:i + 20], diode: np.arange(i, i + 20) * 1.0})
        scan.stop()
        scan.close(EndReason.SUCCESS)
        proc = _writer_process(store, data_root, log_path)
        st = wait_status(store, scan.key, timeout=60)
        assert st.state == "done", (st.error, log_path.read_text()[-3000:])
    finally:
        stop_process(proc)
    with open_scan(str(path)) as archived:
        assert archived.streams["log"][:] == points
        assert archived.streams["diode"][:].tolist() == list(np.arange(600.0))
    with h5py.File(path, "r", locking=False) as f:
        rows = f["1.1/measurement/log"]
        assert text_dataset(rows).shape[0] == rows[-1, 1]


@pytest.mark.parametrize("payload, reason", [
    (b"[1,", "payload is not JSON"),
    (b'["\xff\xfe"]', "payload is not JSON"),  # not UTF-8
    (b"[1]", "payload holds 1 points, expected a list of 2"),
])
def test_bad_json_point_fails_the_scan_keeping_the_points_before(store, writer, data_root,
                                                                 payload, reason):
    from blissdata import keys

    path = data_root / "bad.h5"
    scan, log, diode = _json_scan(store, path)
    points = [point(i) for i in range(4)]
    log.send(points)
    store.redis.xadd(keys.data_key(scan.key, "log"), {"n": 2, "d": payload},
                     id=keys.entry_id(4))
    st = wait_status(store, scan.key, timeout=30)
    assert st.state == "failed"
    assert "'log'" in st.error and "points [4, 6)" in st.error and reason in st.error
    assert "4 points kept" in st.error
    assert read_recipe(path, "1.1/measurement/log") == points
    with open_scan(str(path)) as archived:
        assert archived.streams["log"][:] == points
