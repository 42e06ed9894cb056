"""Points of varying shape keep their shape once archived: in the file (a dataset of shapes
beside the padded points), through open_scan, readers of trimmed points, replay, a rewrite
and a writer killed and restarted."""

import signal
import time

import h5py
import numpy as np
import pytest

from blissdata import EndReason
from blissdata.archive import open_scan
from blissdata.memory_tracker import MemoryTracker
from blissdata.replay import main as replay_main
from writer.commands.cli import main as writer_cli
from writer_helpers import durable_points, start_writer, wait_status

LENGTHS = [3, 10, 6, 13, 9, 5]


def published_points():
    rng = np.random.default_rng(7)
    return {
        "xrf:peaks": [rng.random(n) for n in LENGTHS],
        # integers: padding (fill value 0) could not be told from data
        "mca:counts": [rng.integers(0, 50, n).astype(np.uint32) for n in LENGTHS],
        "cam:roi": [rng.integers(0, 9, s).astype(np.int16)
                    for s in [(2, 3), (4, 1), (1, 5), (3, 3), (2, 2), (5, 4)]],
    }


def same_points(got, want) -> bool:
    return len(got) == len(want) and all(
        g.shape == w.shape and g.dtype == w.dtype and np.array_equal(g, w)
        for g, w in zip(got, want))


def publish(store, path, session="varying", number=1):
    scan = store.create_scan({"session": session, "name": "xrf", "number": number,
                              "path": str(path)},
                             info={"title": "xrf", "type": "timescan", "scan_nb": number})
    points = published_points()
    streams = {name: scan.create_stream(name, dtype=p[0].dtype, shape=(-1,) * p[0].ndim)
               for name, p in points.items()}
    scan.prepare()
    scan.start()
    for a, b in ((0, 4), (4, 6)):  # two Redis entries per stream
        scan.send_many({streams[n]: p[a:b] for n, p in points.items()})
    scan.stop()
    scan.close(EndReason.SUCCESS)
    return scan, points


@pytest.fixture
def written(store, redis_url, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    service, thread = start_writer(redis_url, root)
    try:
        scan, points = publish(store, root / "xrf.h5")
        assert wait_status(store, scan.key).state == "done"
        yield root, scan, points, store
    finally:
        service.stop()
        thread.join(30)


def test_file_holds_each_points_shape(written):
    root, scan, points, store = written
    where = {n: s.file_backing["dataset"] for n, s in store.load_scan(scan.key).streams.items()}
    with h5py.File(root / "xrf.h5", "r", locking=False) as f:
        data = f[where["mca:counts"]]
        assert data.shape == (6, 13)
        shapes = f[data.attrs["point_shapes"]]
        assert shapes.name == where["mca:counts"] + "_point_shapes"
        assert shapes[()].tolist() == [[n] for n in LENGTHS]
        assert f[where["cam:roi"] + "_point_shapes"][()].tolist() == [
            list(p.shape) for p in points["cam:roi"]]


def test_archive_and_trimmed_reads_give_the_published_shapes(written):
    root, scan, points, store = written
    with open_scan(str(root / "xrf.h5"), "1.1") as archived:
        for name, want in points.items():
            stream = archived.streams[name]
            assert same_points(stream[:], want), name
            assert same_points([stream[i] for i in range(6)], want)
            assert same_points(stream[2:5], want[2:5])
            assert same_points(list(stream), want)
            views = archived.cursor([name]).read()
            assert same_points(views[name].data, want)
    # live readers of points the memory tracker trimmed get them from the file
    MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()
    live = store.load_scan(scan.key)
    assert store.redis.xlen(live.streams["mca:counts"].key) == 1  # only the seal is left
    for name, want in points.items():
        assert same_points(live.streams[name][:], want), name


def test_replay_and_rewrite_keep_the_shapes(written, redis_url, tmp_path):
    root, scan, points, store = written
    assert replay_main([str(root / "xrf.h5"), "--redis", redis_url, "--session", "again",
                        "--path", str(root / "again.h5")]) == 0
    replayed = store.load_scan(store.get_last_scan(session="again"))
    for name, want in points.items():
        assert same_points(replayed.streams[name][:], want), name  # from Redis
    assert wait_status(store, replayed.key).state == "done"
    with open_scan(str(root / "again.h5")) as archived:
        for name, want in points.items():
            assert same_points(archived.streams[name][:], want), name
    out = tmp_path / "rewritten.h5"
    assert writer_cli(["rewrite", str(root / "xrf.h5"), str(out), "--compression", "zstd"]) == 0
    with open_scan(str(out)) as archived:
        for name, want in points.items():
            assert same_points(archived.streams[name][:], want), name


def test_files_without_shapes_still_read_padded(tmp_path):
    """A file of an older writer (no point_shapes): the points come back padded, as before."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        e = f.create_group("1.1")
        e.attrs["NX_class"] = "NXentry"
        e["title"] = "old"
        m = e.create_group("measurement")
        m.attrs["NX_class"] = "NXcollection"
        m.create_dataset("x", data=np.array([[1.0, 2, np.nan], [3, 4, 5]]), maxshape=(None, None),
                         chunks=(2, 3))
    with open_scan(str(path)) as archived:
        got = archived.streams["measurement/x"][:]
        assert len(got) == 2 and all(p.shape == (3,) for p in got)


def test_writer_killed_and_restarted_keeps_the_shapes(store, tmp_path):
    from test_writer_restart import start_writer_process
    from writer_helpers import stop_process

    root = tmp_path / "data"
    root.mkdir()
    log = tmp_path / "writer.log"
    proc = start_writer_process(store.url, root, log)
    try:
        time.sleep(1.0)
        scan = store.create_scan({"session": "k", "name": "xrf", "number": 1,
                                  "path": str(root / "k.h5")},
                                 info={"title": "xrf", "type": "timescan", "scan_nb": 1})
        stream = scan.create_stream("xrf:peaks", "int32", (-1,))
        scan.prepare()
        scan.start()
        rng = np.random.default_rng(3)
        points = [rng.integers(1, 100, 1 + (i * 7) % 23).astype(np.int32) for i in range(600)]
        for a in range(0, 300, 50):
            stream.send(points[a:a + 50])
        deadline = time.monotonic() + 20
        while durable_points(store, scan.key, "xrf:peaks") < 300:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for a in range(300, 600, 50):
            stream.send(points[a:a + 50])
        scan.close()
        proc = start_writer_process(store.url, root, log)
        status = wait_status(store, scan.key, timeout=30)
        assert status.state == "done", (status.error, log.read_text())
        with open_scan(str(root / "k.h5")) as archived:
            assert same_points(archived.streams["xrf:peaks"][:], points)
    finally:
        stop_process(proc)
