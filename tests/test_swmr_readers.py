"""Readers of files the writer is still writing (SWMR): real processes, no crash, no short
read, no wrong value.

A writer process appends frames and scalars while the memory tracker trims Redis hard, and 4
reader processes (tests/swmr_reader.py: Stream API, h5api.File, plain h5py with the README's
recipe) read random durable ranges and check every value. The durations are parameters
(``STRESS_S`` environment variable, seconds of full-speed writing; default 10) so that a
longer run is one variable away.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from blissdata import DataStore
from blissdata.h5api import File
from swmr_reader import FRAME_SHAPE, FRAMES_PER_FILE, MAPPING, expected, mapping
from writer_helpers import stop_process, wait_status

HERE = Path(__file__).parent
STRESS_S = float(os.environ.get("STRESS_S", "10"))
READER_MODES = ("stream", "stream", "h5api", "h5py")


def _start(args, log_path, env=None):
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env)


@pytest.fixture
def services(store, tmp_path):
    """A writer process (max_lag_s 0.1) and a memory tracker trimming everything durable
    (budget 1 kB: Redis always uses more)."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    config = tmp_path / "writer.toml"
    config.write_text(f'data_roots = ["{data_root}"]\nmax_lag_s = 0.1\n'
                      'inactivity_timeout_s = 60\n')
    procs = [_start(["-m", "writer.commands.cli", "run", "--config", str(config), "--redis", store.url],
                    tmp_path / "writer.log"),
             _start(["-m", "blissdata.memory_tracker", "--redis", store.url, "--budget", "0.001",
                     "--hard-limit", "100000", "--interval", "0.05"], tmp_path / "tracker.log")]
    time.sleep(1.0)  # the writer subscribes
    yield data_root
    for proc in procs:
        stop_process(proc)
    for proc in procs:
        assert proc.returncode in (0, -15), (tmp_path / "writer.log").read_text()[-3000:]


def _new_scan(store, path, number):
    scan = store.create_scan(
        {"session": "stress", "name": "timescan", "number": number, "path": str(path)},
        info={"title": f"timescan {number}", "type": "timescan", "scan_nb": number,
              "mapping": MAPPING})
    cam = scan.create_stream("cam:image", "uint16", FRAME_SHAPE)
    diode = scan.create_stream("diode:diode", "float64")
    log = scan.create_stream("log:log", encoding="json")  # SWMR too (blissdata/json_points)
    scan.prepare()
    scan.start()
    return scan, cam, diode, log


def _produce(scan, cam, diode, log, seconds, rate=None, batch=8):
    """Frames, scalars and json points for `seconds`: at full speed, or `rate` points per
    second."""
    sent, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        n = batch if rate is None else 1
        scan.send_many({cam: expected("cam:image", sent, sent + n),
                        diode: expected("diode:diode", sent, sent + n),
                        log: expected("log:log", sent, sent + n)})
        sent += n
        if rate is not None:
            time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
    return sent


def _readers(store, scan, seconds, tmp_path, modes=READER_MODES):
    """A reader process per mode (tests/swmr_reader.py); a mode ending in "+nolockenv" runs
    with HDF5_USE_FILE_LOCKING=FALSE, as sites with file systems that cannot lock do."""
    procs = []
    for i, mode in enumerate(modes):
        env = dict(os.environ)
        if mode.endswith("+nolockenv"):
            mode = mode[:-len("+nolockenv")]
            env["HDF5_USE_FILE_LOCKING"] = "FALSE"
        procs.append(subprocess.Popen(
            [sys.executable, str(HERE / "swmr_reader.py"), mode, store.url, scan.key,
             str(seconds), str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env))
    return procs


def _check_readers(procs):
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"reader exit {proc.returncode}: {out} {err[-2000:]}"
        report = json.loads(out.strip().splitlines()[-1])
        assert report["reads"] > 0, report
        reports.append(report)
    return reports


def _run(store, services, tmp_path, seconds, rate=None, second_scan=False,
         modes=READER_MODES):
    path = services / "sample" / "sample.h5"
    scan, cam, diode, log = _new_scan(store, path, 1)
    readers = _readers(store, scan, seconds + 2, tmp_path, modes)
    second = None
    if second_scan:  # another scan of the session starts in the same file mid-way
        def later():
            nonlocal second
            time.sleep(seconds / 2)
            second = _new_scan(store, path, 2)
            _produce(*second, seconds / 4, rate=50)
            second[0].stop()
            second[0].close()
        starter = threading.Thread(target=later)
        starter.start()
    sent = _produce(scan, cam, diode, log, seconds, rate)
    scan.stop()
    scan.close()
    if second_scan:
        starter.join()
    reports = _check_readers(readers)
    for key in [scan.key] + ([second[0].key] if second else []):
        st = wait_status(store, key, timeout=60)
        assert st.state == "done", st.error
    # "done": the file is closed and unlocked; plain h5py with HDF5's default locking opens it
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["1.1/measurement/diode"][()], expected("diode:diode", 0, sent))
        assert f["1.1/measurement/cam"].shape == (sent, *FRAME_SHAPE)
        assert np.array_equal(f["1.1/measurement/cam"][-5:], expected("cam:image", sent - 5, sent))
        assert f["1.1/measurement/log"].shape == (sent, 2)
        if second_scan:
            assert f["2.1/measurement/diode"].shape[0] > 0
    return sent, reports


def test_readers_while_writing_full_speed(store, services, tmp_path):
    sent, reports = _run(store, services, tmp_path, STRESS_S)
    print(sent, reports)


def test_readers_while_writing_20_points_per_s(store, services, tmp_path):
    _run(store, services, tmp_path, max(4.0, STRESS_S / 4), rate=20)


def test_readers_while_a_second_scan_starts_in_the_shared_file(store, services, tmp_path):
    _run(store, services, tmp_path, max(5.0, STRESS_S / 2), second_scan=True)


#: the field's tools, each in a process of its own, on the shared file and the scan's own file
FIELD_TOOLS = ("silx", "silx@own", "h5py", "h5py@own", "h5py-nolock@own",
               "silx@own+nolockenv")


@pytest.mark.parametrize("rate", [None, 20])
def test_field_tools_read_while_writing(store, services, tmp_path, rate):
    """silx.io.open (what silx view does), h5py.File(path, "r", swmr=True) with HDF5's
    default locking, the same with locking off (and with HDF5_USE_FILE_LOCKING=FALSE): each
    opens the scan while it is written, on both paths, and reads every durable point right
    (the writer holds no lock on the HDF5 file once SWMR writing starts)."""
    seconds = max(4.0, STRESS_S / 2)
    _, reports = _run(store, services, tmp_path, seconds, rate=rate, modes=FIELD_TOOLS)
    assert [r["mode"] for r in reports] == [m.split("+")[0] for m in FIELD_TOOLS]
    print(reports)


def test_two_data_stores_and_h5api_in_one_process(store, services, tmp_path):
    """HDF5 shares one open file per process: readers opened at different lengths of a
    growing file all get every point they ask for."""
    path = services / "one" / "one.h5"
    scan, cam, diode, log = _new_scan(store, path, 1)
    stores = [DataStore(store.url), DataStore(store.url)]
    api = None
    sent, checked = 0, 0
    try:
        for _ in range(40):
            scan.send_many({cam: expected("cam:image", sent, sent + 5),
                            diode: expected("diode:diode", sent, sent + 5),
                            log: expected("log:log", sent, sent + 5)})
            sent += 5
            deadline = time.monotonic() + 10
            while any((scan.streams[n].file_backing or {}).get("points", 0) < sent
                      for n in ("diode:diode", "cam:image", "log:log")):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for name in ("diode:diode", "cam:image", "log:log"):
                store.redis.xtrim(scan.streams[name].key, maxlen=1, approximate=False)
            if api is None:
                api = File(stores[0], str(path))
            for reader in stores:
                s = reader.load_scan(scan.key)
                assert np.array_equal(s.streams["diode:diode"][0:sent],
                                      expected("diode:diode", 0, sent))
                assert np.array_equal(s.streams["cam:image"][sent - 5:sent],
                                      expected("cam:image", sent - 5, sent))
                assert np.array_equal(s.streams["cam:image"][sent - 1],
                                      expected("cam:image", sent - 1, sent)[0])
                assert s.streams["log:log"][0:sent] == expected("log:log", 0, sent)
                assert s.streams["log:log"][sent - 1] == expected("log:log", sent - 1, sent)[0]
            assert np.array_equal(api["/measurement/diode"][0:sent],
                                  expected("diode:diode", 0, sent))
            assert api["/measurement/log"][sent - 5:sent] == expected("log:log", sent - 5, sent)
            checked += 1
    finally:
        for reader in stores:
            reader.close()
    scan.stop()
    scan.close()
    assert checked == 40
    assert wait_status(store, scan.key, timeout=30).state == "done"


def _references_scan(store, path):
    scan = store.create_scan(
        {"session": "stress", "name": "timescan", "number": 1, "path": str(path)},
        info={"title": "references", "type": "timescan", "scan_nb": 1,
              "mapping": mapping(["det:ref", "diode:diode"])})
    ref = scan.create_stream("det:ref", encoding="references")
    diode = scan.create_stream("diode:diode", "float64")
    scan.prepare()
    scan.start()
    return scan, ref, diode


@pytest.mark.parametrize("rate", [None, 20])
def test_readers_of_a_references_stream_while_written(store, services, tmp_path, rate):
    """Frames in a detector's own files, the virtual dataset over them in a file of its own
    replaced at each flush (docs/files.md): readers never see a file being written."""
    folder = services / "refs"
    folder.mkdir()
    path = folder / "refs.h5"
    scan, ref, diode = _references_scan(store, path)
    seconds = max(4.0, STRESS_S / 2) if rate is None else 4.0
    readers = _readers(store, scan, seconds + 2, tmp_path)
    sent, t0, k = 0, time.monotonic(), 0
    while time.monotonic() - t0 < seconds:
        name = f"det_{k:04d}.h5"  # the detector writes a file, then publishes its frames
        with h5py.File(folder / name, "w") as f:
            f["data"] = expected("det:ref", sent, sent + FRAMES_PER_FILE)
        for i in range(FRAMES_PER_FILE):
            scan.send_many({ref: {"file": name, "dataset": "/data", "index": i},
                            diode: expected("diode:diode", sent, sent + 1)})
            sent += 1
            if rate is not None:
                time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
        k += 1
    scan.stop()
    scan.close()
    reports = _check_readers(readers)
    assert wait_status(store, scan.key, timeout=60).state == "done"
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["1.1/measurement/ref"][()], expected("det:ref", 0, sent))
        assert np.array_equal(f["1.1/measurement/diode"][()], expected("diode:diode", 0, sent))
    print(sent, reports)


def _open_files() -> set:
    """Names of the HDF5 files this process has open."""
    return {h5py.h5f.get_name(i).decode() for i in
            h5py.h5f.get_obj_ids(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)}


def _wait_durable(scan, sent, names=("diode:diode", "cam:image")):
    deadline = time.monotonic() + 20
    while any((scan.streams[n].file_backing or {}).get("points", 0) < sent for n in names):
        assert time.monotonic() < deadline, "the writer did not make the points durable"
        time.sleep(0.01)
    for name in names:  # trimmed from Redis: readers get them from the file
        scan.store.redis.xtrim(scan.streams[name].key, maxlen=1, approximate=False)


def test_blissdata_and_the_field_tools_in_one_process(store, services, tmp_path):
    """A notebook: blissdata's reads (Stream, h5api.File, open_scan) and the user's own
    h5py.File, silx.io.open and nxload of the same files, in both orders, during and after
    the scan. blissdata holds a file only while it reads it."""
    import silx.io
    from nexusformat.nexus import nxload

    from blissdata.archive import open_scan
    from writer.hdf5.shared_file import scan_file_in

    shared = services / "nb" / "nb.h5"
    own = scan_file_in(shared, "1.1")
    scan, cam, diode, log = _new_scan(store, shared, 1)
    reader = DataStore(store.url)
    live = reader.load_scan(scan.key)

    def blissdata_reads(n):
        assert np.array_equal(live.streams["diode:diode"][0:n], expected("diode:diode", 0, n))
        assert np.array_equal(live.streams["cam:image"][n - 1],
                              expected("cam:image", n - 1, n)[0])
        with File(reader, str(shared)) as api:
            assert np.array_equal(api["/measurement/diode"][0:n],
                                  expected("diode:diode", 0, n))

    def user_reads(f, n):
        assert np.array_equal(f["1.1/measurement/diode"][0:n], expected("diode:diode", 0, n))

    try:
        sent = 0
        for order in ("blissdata first", "user first"):
            scan.send_many({cam: expected("cam:image", sent, sent + 10),
                            diode: expected("diode:diode", sent, sent + 10),
                            log: expected("log:log", sent, sent + 10)})
            sent += 10
            _wait_durable(live, sent)
            if order == "blissdata first":
                blissdata_reads(sent)
                assert str(own) not in _open_files()  # let go once read
            with h5py.File(own, "r", swmr=True) as f1, silx.io.open(str(shared)) as f2, \
                    silx.io.open(str(own)) as f3:
                for f in (f1, f2, f3):
                    user_reads(f, sent)
                if order == "user first":
                    blissdata_reads(sent)  # while the user's files are open
            with open_scan(str(shared)) as archived:  # the scan's file read while written
                assert len(archived.streams["diode:diode"]) >= sent
        scan.stop()
        scan.close()
        assert wait_status(store, scan.key, timeout=60).state == "done"
        # after the scan: h5py's defaults, silx and nexusformat, in both orders
        blissdata_reads(sent)
        for path in (shared, own):
            with h5py.File(path, "r") as f:
                user_reads(f, sent)
            with silx.io.open(str(path)) as f:
                user_reads(f, sent)
            assert np.array_equal(nxload(str(path))["1.1/measurement/diode"].nxdata,
                                  expected("diode:diode", 0, sent))
        with h5py.File(shared, "r") as f:
            blissdata_reads(sent)
            with open_scan(str(shared)) as archived:
                assert np.array_equal(archived.streams["diode:diode"][:],
                                      expected("diode:diode", 0, sent))
            user_reads(f, sent)
        reader.close()
        assert not {str(shared), str(own)} & _open_files()  # close() released every file
    finally:
        reader.close()
