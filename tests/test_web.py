"""`blisswriter serve` over HTTP: the real server process, real files written by the real
writer process (finished, and growing while the test reads them), every refused path and
bad request, the base path, and the committed page bundle."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from web_helpers import get, h5grove, start_serve, start_writer_process
from writer.web import bundle
from writer_helpers import (SEED_MAPPING, SEED_STREAMS, durable_points, expected_seed_data, seed_scan,
                            stop_process, wait_status)

DIODE = SEED_STREAMS[0]


@pytest.fixture
def writer(store, data_root, tmp_path):
    proc = start_writer_process(store.url, data_root, tmp_path)
    yield proc
    stop_process(proc)


@pytest.fixture
def server(store, data_root, tmp_path):
    proc, url = start_serve([data_root], store.url, log_path=tmp_path / "serve.log")
    yield url
    stop_process(proc)
    assert proc.returncode in (0, -15), (tmp_path / "serve.log").read_text()[-3000:]


def test_finished_scan(store, data_root, writer, server):
    master = data_root / "sample.h5"
    scan, data = seed_scan(store, master, npoints=20)
    st = wait_status(store, scan.key)
    assert st.state == "done" and st.file == str(master), st

    status, root = h5grove(server, "meta", master, "/")
    assert status == 200, root
    entry = next(c for c in root["children"] if c["name"] == "1.1")
    assert entry["kind"] == "group"  # the shared file's external link, followed
    status, meta = h5grove(server, "meta", master, "/1.1/measurement/diode")
    assert (status, meta["kind"], meta["name"], meta["shape"]) == (200, "dataset", "diode", [20])
    assert h5grove(server, "attr", master, "/1.1", attr_keys="NX_class") == (
        200, {"NX_class": "NXentry"})
    status, values = h5grove(server, "data", master, "/1.1/measurement/diode", selection="2:5")
    assert status == 200 and np.allclose(values, data[DIODE][2:5])
    status, raw = h5grove(server, "data", master, "/1.1/instrument/diode/data", format="bin",
                          dtype="safe")
    assert status == 200 and np.array_equal(np.frombuffer(raw, "<f8"), data[DIODE])
    status, stats = h5grove(server, "stats", master, "/1.1/measurement/diode")
    assert status == 200 and np.isclose(stats["max"], data[DIODE].max())
    status, paths = h5grove(server, "paths", master, "/1.1")
    assert status == 200 and "/1.1/measurement/diode" in paths

    status, body = get(server + "api/scans")
    scans = json.loads(body)["scans"]
    assert status == 200 and [(s["state"], s["file"], s["entry"], s["points"], s["live"])
                              for s in scans] == [("done", str(master), "1.1", 20, False)]
    status, body = get(f"{server}api/files?folder={data_root}")
    listed = json.loads(body)
    assert status == 200 and str(master) in [f["path"] for f in listed["files"]]


def test_scan_being_written_grows(store, data_root, writer, server):
    """The points the server returns grow between two requests while the writer appends."""
    master = data_root / "live.h5"
    scan = store.create_scan(
        {"session": "test_session", "name": "ascan", "number": 1, "path": str(master)},
        info={"title": "ascan roby 0 1 100 0.1", "type": "ascan", "scan_nb": 1,
              "npoints": 100, "mapping": SEED_MAPPING})
    streams = [scan.create_stream(name, "float64") for name in SEED_STREAMS]
    scan.prepare()
    scan.start()
    data = expected_seed_data(60)
    scan.send_many({s: data[s.name] for s in streams})
    deadline = time.monotonic() + 20
    while durable_points(store, scan.key, DIODE) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    st = wait_status(store, scan.key, states=("writing",))
    status, first = h5grove(server, "data", master, "/1.1/measurement/diode")
    assert status == 200 and len(first) == 60, first
    assert np.allclose(first, data[DIODE][:60])

    more = 1.0 + np.arange(40.0)
    for stream in streams:  # 40 more points on every stream
        stream.send(more)
    while durable_points(store, scan.key, DIODE) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, meta = h5grove(server, "meta", master, "/1.1/measurement/diode")
    assert status == 200 and meta["shape"] == [100], meta
    status, second = h5grove(server, "data", master, "/1.1/measurement/diode",
                             selection="50:100")
    assert status == 200 and np.allclose(second, np.concatenate([data[DIODE][50:], more])), \
        second[8:]
    status, body = get(server + "api/scans")
    row = json.loads(body)["scans"][0]
    assert (row["state"], row["live"], row["file"], row["entry"]) == (
        "writing", True, str(master), "1.1"), (row, st)
    scan.stop()
    scan.close()
    assert wait_status(store, scan.key).state == "done"
    status, meta = h5grove(server, "meta", master, "/1.1/measurement/diode")
    assert meta["shape"] == [100]


@pytest.fixture
def files(tmp_path):
    """Two data roots, a folder outside them, and files that try to reach it."""
    root, other, outside = tmp_path / "root", tmp_path / "other_root", tmp_path / "outside"
    for folder in (root, other, outside):
        folder.mkdir()
    secret = np.arange(1000.0) + 0.123  # values that must never be served
    with h5py.File(outside / "secret.h5", "w") as f:
        f["values"] = secret
    with h5py.File(other / "allowed.h5", "w") as f:
        f["values"] = np.arange(5)
    with h5py.File(root / "scan.h5", "w") as f:
        f["entry/x"] = np.arange(1000.0)
        f["entry"].attrs["NX_class"] = "NXentry"
        f["ext_out"] = h5py.ExternalLink(str(outside / "secret.h5"), "/")
        f["ext_relative_out"] = h5py.ExternalLink("../outside/secret.h5", "/")
        f["ext_in"] = h5py.ExternalLink(str(other / "allowed.h5"), "/")
        f["soft_out"] = h5py.SoftLink("/ext_out/values")
        f["loop_a"] = h5py.SoftLink("/loop_b/x")
        f["loop_b"] = h5py.SoftLink("/loop_a")
        f["self_ext"] = h5py.ExternalLink("scan.h5", "/self_ext")  # a file linking itself
        layout = h5py.VirtualLayout((1000,), "f8")
        layout[:] = h5py.VirtualSource(str(outside / "secret.h5"), "values", (1000,))
        f.create_virtual_dataset("vds_out", layout)
        layout = h5py.VirtualLayout((5,), "i8")
        layout[:] = h5py.VirtualSource(str(other / "allowed.h5"), "values", (5,))
        f.create_virtual_dataset("vds_in", layout)
    os.symlink(outside / "secret.h5", root / "link_out.h5")
    os.symlink(outside, root / "dir_out")
    (root / "text.h5").write_text("not HDF5")
    (root / "folder.h5").mkdir()
    return root, other, outside, secret


def test_refused_paths_and_bad_requests(files, tmp_path):
    root, other, outside, secret = files
    proc, url = start_serve([root, other], None, "--max-selection-mb", "0.001",
                            log_path=tmp_path / "serve.log")
    scan = root / "scan.h5"
    try:
        cases = [  # (endpoint, file, path, params, status, words in the message)
            ("meta", f"{root}/../outside/secret.h5", "/", {}, 403, "'..'"),
            ("meta", outside / "secret.h5", "/", {}, 403, "outside the data roots"),
            ("meta", "scan.h5", "/", {}, 400, "absolute path"),
            ("meta", "", "/", {}, 400, "no file given"),
            ("data", root / "link_out.h5", "/values", {}, 403, "symlink"),
            ("meta", root / "dir_out" / "secret.h5", "/", {}, 403, "symlink"),
            ("meta", scan, "/ext_out/values", {}, 403, "external link /ext_out"),
            ("data", scan, "/ext_out/values", {}, 403, "outside the data roots"),
            ("data", scan, "/ext_relative_out/values", {}, 403, "outside the data roots"),
            ("data", scan, "/soft_out", {}, 403, "external link /ext_out"),
            ("data", scan, "/vds_out", {}, 403, "virtual dataset /vds_out"),
            ("meta", root / "missing.h5", "/", {}, 404, "no such file"),
            ("meta", root / "folder.h5", "/", {}, 404, "not a file"),
            ("meta", scan, "/entry/nothing", {}, 404, "not a valid path"),
            ("meta", scan, "entry", {}, 422, "must start with '/'"),
            ("meta", scan, "/loop_a", {}, 404, "a loop?"),
            ("meta", scan, "/self_ext/x", {}, 404, "a loop?"),
            ("meta", root / "text.h5", "/", {}, 422, "cannot be opened as HDF5"),
            ("data", scan, "/entry/x", {"selection": "2000"}, 422, "out of range"),
            ("data", scan, "/entry/x", {"selection": "a:b"}, 422, "not a slice"),
            ("data", scan, "/entry/x", {"selection": "0,0"}, 422, "2 members for a 1D"),
            ("data", scan, "/entry/x", {"selection": "0:10:-1"}, 422, "step"),
            ("data", scan, "/entry/x", {}, 413, "over the server's limit"),
            ("data", scan, "/entry/x", {"format": "xml", "selection": "0:2"}, 422, "format"),
            ("data", scan, "/entry/x", {"dtype": "int", "selection": "0:2"}, 422, "dtype"),
            ("data", scan, "/entry", {}, 422, "not a dataset"),
            ("attr", scan, "/entry", {"attr_keys": "missing"}, 404, "no attribute"),
        ]
        for endpoint, file, path, params, status, words in cases:
            got, body = h5grove(url, endpoint, file, path, **params)
            assert (got, words in str(body)) == (status, True), (endpoint, file, path, params,
                                                                 got, body)
            assert "0.123" not in str(body)  # never a value of the file outside
        # what the roots allow, in the same file and in the second root
        assert h5grove(url, "data", scan, "/ext_in/values") == (200, [0, 1, 2, 3, 4])
        assert h5grove(url, "data", scan, "/vds_in") == (200, [0, 1, 2, 3, 4])
        assert h5grove(url, "data", scan, "/entry/x", selection="0:3") == (200, [0.0, 1.0, 2.0])
        assert h5grove(url, "data", other / "allowed.h5", "/values")[0] == 200
        status, meta = h5grove(url, "meta", scan, "/")
        kinds = {c["name"]: c["kind"] for c in meta["children"]}
        assert (kinds["ext_out"], kinds["soft_out"], kinds["ext_in"], kinds["vds_out"]) == (
            "external_link", "soft_link", "group", "dataset"), kinds  # shown, not followed
        # the folder listing and the methods: read-only, nothing outside
        assert get(f"{url}api/files?folder={outside}")[0] == 403
        listed = json.loads(get(f"{url}api/files?folder={root}")[1])
        assert sorted(Path(f["path"]).name for f in listed["files"]) == ["scan.h5", "text.h5"]
        assert get(f"{url}h5grove/meta/?file={scan}", method="POST")[0] == 405
        assert get(f"{url}h5grove/meta/?file={scan}", method="DELETE")[0] == 405
        assert proc.poll() is None  # still serving after every refusal
        assert h5grove(url, "meta", scan, "/entry/x")[0] == 200
    finally:
        stop_process(proc)


def test_base_path_and_page(files, tmp_path):
    """Behind a reverse proxy that keeps the prefix: everything under --base-path."""
    root = files[0]
    proc, url = start_serve([root], None, "--base-path", "/viewer")
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/viewer/")  # loopback
        status, page = get(url)
        assert status == 200 and b'src="static/app.js' in page  # relative: any prefix works
        assert get(url + "static/app.js")[0] == 200 and get(url + "static/app.css")[0] == 200
        assert h5grove(url, "meta", root / "scan.h5", "/entry/x")[0] == 200
        assert get(url[:-len("viewer/")] + "h5grove/meta/?file=" + str(root / "scan.h5"))[0] \
            == 404
        status, body = get(url + "api/info")
        assert status == 200 and str(root) in body.decode()
        status, body = get(url + "api/scans")  # --no-redis: said, not an error
        assert status == 200 and b"no Redis" in body
    finally:
        stop_process(proc)


def test_default_port_taken_next_one(tmp_path):
    """Without --port: 8765, else the next free port (a second viewer starts too)."""
    first, url1 = start_serve([tmp_path], None, port=None)
    try:
        second, url2 = start_serve([tmp_path], None, port=None)
        try:
            ports = [int(u.rsplit(":", 1)[1].strip("/")) for u in (url1, url2)]
            assert ports[0] != ports[1] and all(8765 <= p < 8775 for p in ports), ports
            assert get(url2 + "api/info")[0] == 200
        finally:
            stop_process(second)
    finally:
        stop_process(first)


def test_bad_options(tmp_path):
    for extra, words in ([["--data-root", str(tmp_path / "missing")], "not an existing folder"],
                         [["--data-root", str(tmp_path), "--base-path", "/a/../b"], "'..'"]):
        done = subprocess.run([sys.executable, "-m", "writer.commands.cli", "serve", "--no-redis",
                               "--port", "0", *extra], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and words in done.stderr, done.stderr


def test_committed_bundle_matches_its_sources():
    """The page in writer/web/static is built from writer/web/frontend as committed."""
    assert bundle.built_hash() == bundle.source_hash(), (
        f"writer/web/static is older than writer/web/frontend: rebuild it ({bundle.REBUILD}) "
        f"and commit writer/web/static")
    page = (bundle.STATIC / "index.html").read_text()
    for name in ("app.js", "app.css"):
        assert f"static/{name}" in page and (bundle.STATIC / name).stat().st_size > 1000
