"""Every fixture published, written by the real writer, validated, and compared point by point;
and blissdata-simulate's bad inputs."""

import json
import time

import h5py
import numpy as np
import pytest

from blissdata.fixtures import (FixtureError, external_frame, generate, list_fixtures,
                                load_fixture, publish)
from blissdata.simulate import main as simulate
from writer.scan.mapping import parse_mapping
from writer.commands.validate import validate_file
from writer_helpers import start_writer, wait_status


@pytest.fixture(scope="module")
def written(redis_url, tmp_path_factory):
    """Publish every fixture once (a fresh Redis db) with the writer running; the files."""
    import redis

    from blissdata import DataStore

    redis.Redis.from_url(redis_url).flushall()
    root = tmp_path_factory.mktemp("fixtures")
    store = DataStore(redis_url)
    service, thread = start_writer(redis_url, root)
    time.sleep(0.2)
    results = {}
    try:
        for k, name in enumerate(list_fixtures()):
            fixture = load_fixture(name)
            path = root / "session" / f"{name}.h5"
            scans = publish(store, fixture, session="session", path=str(path), number=1)
            statuses = [wait_status(store, s.key, timeout=60) for s in scans]
            results[name] = (fixture, path, scans, statuses)
    finally:
        service.stop()
        thread.join(30)
    return results


@pytest.mark.parametrize("name", list_fixtures())
def test_fixture_written_valid_and_equal(written, name):
    fixture, path, scans, statuses = written[name]
    for st in statuses:
        assert st.state == "done", st.error
    report = validate_file(path)
    assert report.ok, report.errors
    with h5py.File(path, "r", locking=False) as f:
        for scan in scans:
            entry = f[f"{scan.number}.1"]
            scan_fixture = fixture if scan is scans[0] else load_fixture(
                fixture["subscans"]["fixture"])
            npoints = len(scan.streams[next(iter(scan.streams))])
            expected = generate(scan_fixture, scan.info["npoints"])
            layout = parse_mapping(scan.info["mapping"])
            assert entry["end_reason"][()].decode() == scan.info["end_reason"]
            for leaf in layout.streams:
                got = entry[leaf.path[1:]]
                want = expected[leaf.stream][:npoints]
                recipe = next(s["recipe"] for s in scan_fixture["streams"]
                              if s["name"] == leaf.stream)
                if recipe["kind"] == "external_frame":
                    want = np.stack([external_frame(recipe, k) for k in range(npoints)])
                if isinstance(want, list):  # varying shape: padded with NaN
                    assert got.shape[0] == len(want)
                    for row, point in zip(got[()], want):
                        assert np.array_equal(row[:len(point)], point)
                        assert np.isnan(row[len(point):]).all()
                else:
                    assert np.array_equal(got[()], np.asarray(want)), leaf.path


def test_aborted_has_fewer_points(written):
    fixture, path, scans, _ = written["aborted"]
    with h5py.File(path, "r", locking=False) as f:
        assert len(f["1.1/measurement/diode"]) < fixture["info"]["npoints"]
        assert f["1.1/end_reason"][()] == b"USER_ABORT"


def test_mesh_image_and_sequence_groups(written):
    _, path, _, _ = written["mesh"]
    with h5py.File(path, "r", locking=False) as f:
        grid = f["1.1/grid"]
        assert f["1.1"].attrs["default"] == "grid"
        assert grid["diode"].shape == (8, 10)
        assert np.array_equal(grid["diode"][()].ravel(), f["1.1/measurement/diode"][()])
        assert list(grid.attrs["axes"]) == ["samz", "samy"]
    _, path, scans, _ = written["sequence"]
    parent, children = scans[0], scans[1:]
    assert [c.info["group"] for c in children] == [parent.key] * 3
    with h5py.File(path, "r", locking=False) as f:
        assert sorted(f) == ["1.1", "2.1", "3.1", "4.1"]


def test_simulate_cli(redis_url, redis_client, tmp_path, capsys):
    assert simulate(["ascan", "--points", "5", "--redis", redis_url, "--session", "cli",
                     "--path", str(tmp_path / "a.h5")]) == 0
    out = capsys.readouterr().out
    assert "5/5 points published" in out and "blissdata:scan:" in out
    assert simulate(["--list"]) == 0
    assert "timescan_lima" in capsys.readouterr().out


def test_simulate_bad_inputs(redis_url, tmp_path, capsys):
    assert simulate(["no_such_fixture", "--redis", redis_url]) == 2
    err = capsys.readouterr().err
    assert "no_such_fixture" in err and "known fixtures" in err and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    assert simulate([str(bad), "--redis", redis_url]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text(json.dumps({"info": {}, "streams": [{"name": "x", "recipe": {"kind": "?"}}]}))
    assert simulate([str(bad), "--redis", redis_url]) == 2
    assert "unknown recipe kind '?'" in capsys.readouterr().err
    assert simulate(["ascan", "--redis", "redis://127.0.0.1:1"]) == 1
    assert "redis://127.0.0.1:1" in capsys.readouterr().err
    with pytest.raises(FixtureError, match="missing key 'streams'"):
        bad.write_text(json.dumps({"info": {}}))
        load_fixture(str(bad))


PEAK_RSS = """
import resource, runpy, sys
sys.argv = ["blissdata-simulate", *sys.argv[1:]]
try:
    runpy.run_module("blissdata.simulate", run_name="__main__")
finally:
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def _simulate_peak_rss_mb(redis_url, tmp_path, points) -> float:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "timescan_lima", "--points",
                           str(points), "--redis", redis_url, "--session", "rss",
                           "--path", str(tmp_path / f"rss{points}.h5")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{points}/{points} points published" in done.stdout
    return int(done.stdout.split("peak_rss_kb")[1].split()[0]) / 1024


def test_simulate_makes_frames_as_it_publishes(tmp_path):
    """A process publishing 320 frames (512x512 uint16: 160 MB) holds a batch of them at a
    time: its peak memory is about that of one publishing 8 frames."""
    from blissdata.redis_server import EmbeddedRedis

    with EmbeddedRedis() as server:  # a private server: the frames stay out of the shared one
        few = _simulate_peak_rss_mb(server.url, tmp_path, 8)
        many = _simulate_peak_rss_mb(server.url, tmp_path, 320)
    assert many - few < 40, (few, many)  # building every frame first: + 160 MB


def test_simulate_mesh_keeps_its_grid_when_points_fit_it(redis_url, redis_client, tmp_path):
    from blissdata import DataStore

    store = DataStore(redis_url)
    for points, grid in ((80, [8, 10]), (20, None)):
        assert simulate(["mesh", "--points", str(points), "--redis", redis_url, "--session",
                         f"mesh{points}", "--path", str(tmp_path / "m.h5")]) == 0
        scan = store.load_scan(store.get_last_scan(session=f"mesh{points}"))
        assert scan.info.get("grid_shape") == grid
