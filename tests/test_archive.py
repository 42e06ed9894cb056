"""Archived scans read like live ones; replay and rewrite round trips for every fixture."""

import os
import time

from pathlib import Path

import h5py
import numpy as np
import pytest

from blissdata import DataStore, ScanState
from blissdata.archive import ArchiveError, open_scan
from blissdata.fixtures import list_fixtures, load_fixture, publish
from blissdata.replay import main as replay_main, replay
from writer.commands.cli import main as writer_cli
from writer.commands.validate import validate_file
from writer_helpers import start_writer, wait_status


def tree(group) -> dict:
    """Layout of an entry: path -> NX_class (groups) or shape/dtype (datasets), without the
    writer's own notes and times."""
    out = {}

    def visit(name, obj):
        if name.split("/")[0] in ("writer_status", "scan_header"):
            return
        if isinstance(obj, h5py.Group):
            out[name] = obj.attrs.get("NX_class")
        else:
            out[name] = (obj.shape, obj.dtype.str) if obj.ndim else "scalar"
    group.visititems(visit)
    return out


def equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and np.array_equal(a, b)


@pytest.fixture(scope="module")
def round_trips(redis_url, tmp_path_factory):
    """Every fixture: published and written (A), each entry replayed and written (B)."""
    from blissdata.store import connect

    connect(redis_url).flushall()
    root = tmp_path_factory.mktemp("archive")
    store = DataStore(redis_url)
    service, thread = start_writer(redis_url, root)
    time.sleep(0.2)
    out = {}
    try:
        for name in list_fixtures():
            a = root / "a" / f"{name}.h5"
            scans = publish(store, load_fixture(name), session="a", path=str(a))
            for s in scans:
                assert wait_status(store, s.key, timeout=60).state == "done"
            b = root / "b" / f"{name}.h5"
            entries = []
            with h5py.File(a, "r", locking=False) as f:
                entries = sorted(f)
            for entry in entries:
                with open_scan(str(a), entry) as archived:
                    again = replay(store, archived, session="b", path=str(b))
                assert wait_status(store, again.key, timeout=60).state == "done"
            out[name] = (a, b, entries)
    finally:
        service.stop()
        thread.join(30)
    return out


@pytest.mark.parametrize("name", list_fixtures())
def test_replay_round_trip_gives_identical_data(round_trips, name):
    a, b, entries = round_trips[name]
    assert validate_file(b).ok
    with h5py.File(a, "r", locking=False) as fa, h5py.File(b, "r", locking=False) as fb:
        for entry in entries:
            ta, tb = tree(fa[entry]), tree(fb[entry])
            assert ta.keys() == tb.keys(), set(ta) ^ set(tb)
            for path, what in ta.items():
                assert tb[path] == what, path
                if isinstance(fa[entry][path], h5py.Dataset) and fa[entry][path].ndim:
                    assert equal(fa[entry][path][()], fb[entry][path][()]), path
            assert fb[entry]["end_reason"][()] == fa[entry]["end_reason"][()]


def test_archived_scan_has_the_live_surface(round_trips):
    a, _, _ = round_trips["ascan"]
    with open_scan(str(a), "1.1") as scan:
        assert scan.state == ScanState.CLOSED and scan.update() is False
        assert scan.info["title"] == "ascan roby -1 1 40 0.1"
        assert scan.info["mapping"] == load_fixture("ascan")["info"]["mapping"]
        diode = scan.streams["diode:diode"]
        assert len(diode) == 41 and diode.dtype == np.float64
        assert equal(diode[3:7], diode[:][3:7]) and diode[-1] == diode[40]
        assert equal(diode[2:12:5], diode[:][2:12:5]) and len(diode[9:3]) == 0
        with pytest.raises(ValueError, match="step must be >= 1"):  # as live, as h5py
            diode[::-1]
        cursor = scan.cursor(["diode:diode", "axis:roby"])
        views = cursor.read()
        assert views["axis:roby"].index == 0 and len(views["axis:roby"]) == 41
        assert cursor.ended == {"diode:diode", "axis:roby"}


def test_open_scan_bad_inputs(tmp_path, round_trips):
    a, _, _ = round_trips["ct"]
    with pytest.raises(ArchiveError, match="no entry '9.1'.*entries: 1.1"):
        open_scan(str(a), "9.1")
    with pytest.raises(ArchiveError, match="no such file"):
        open_scan(str(tmp_path / "nope.h5"))
    text = tmp_path / "x.txt"
    text.write_text("hello")
    with pytest.raises(ArchiveError, match="not an HDF5 file"):
        open_scan(str(text))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["data"] = [1, 2]
    with pytest.raises(ArchiveError, match="not a NeXus file"):
        open_scan(str(plain))


def test_foreign_file_replays_what_it_can(store, tmp_path, capsys, redis_url):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        e = f.create_group("scan7")
        e.attrs["NX_class"] = "NXentry"
        e["title"] = "someone else's scan"
        d = e.create_group("data")
        d.attrs["NX_class"] = "NXdata"
        d["counts"] = np.arange(10.0)
        d["counts"].attrs["units"] = "counts"
        d["image"] = np.ones((10, 4, 4), np.uint16)
        d["table"] = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
        d.attrs["signal"] = "counts"
    with open_scan(str(path)) as scan:
        assert sorted(scan.streams) == ["data/counts", "data/image"]
        assert "table" in str(scan.not_replayable)
        assert scan.info["title"] == "someone else's scan"
    assert replay_main([str(path), "--redis", redis_url, "--session", "r",
                        "--path", str(tmp_path / "r.h5")]) == 0
    captured = capsys.readouterr()
    assert "not replayed: /data/table: dtype" in captured.err
    key = store.get_last_scan(session="r")
    replayed = store.load_scan(key)
    assert equal(replayed.streams["data/counts"][:], np.arange(10.0))
    assert replayed.info["mapping"][1]["data"][1]["counts"][0] == {"units": "counts"}


def test_replay_cli_bad_inputs(tmp_path, capsys):
    assert replay_main([str(tmp_path / "none.h5")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_replay_at_original_pace(store, tmp_path, round_trips):
    a2, _, _ = round_trips["a2scan"]  # 31 points, count_time 0.1: 3 s at speed 1
    calls = []
    with open_scan(str(a2)) as archived:
        scan = replay(store, archived, session="pace", path=str(tmp_path / "p.h5"), speed=20,
                      progress=lambda done, total: calls.append(done))
    assert calls == list(range(1, 32))  # one point at a time, each at its own moment
    assert store.redis.xlen(scan.streams["diode:diode"].key) == 32  # 31 entries + the seal


def test_rewrite_gzip_file_to_bslz4(tmp_path, capsys):
    src = tmp_path / "old.h5"
    frames = np.random.default_rng(0).poisson(20, (30, 64, 64)).astype(np.uint16)
    with h5py.File(src, "w") as f:
        e = f.create_group("1.1")
        e.attrs["NX_class"] = "NXentry"
        e["title"] = "old"
        e.create_dataset("frames", data=frames, chunks=(1, 64, 64), compression="gzip",
                         maxshape=(None, 64, 64))
        e["frames"].attrs["units"] = "counts"
        e["alias"] = h5py.SoftLink("/1.1/frames")
        e["hard"] = e["frames"]
        e.create_dataset("vary", data=np.arange(12.0).reshape(3, 4), chunks=(2, 4),
                         maxshape=(None, None), compression="gzip")
    dst = tmp_path / "new.h5"
    assert writer_cli(["rewrite", str(src), str(dst), "--compression", "bitshuffle-lz4"]) == 0
    assert "datasets rewritten" in capsys.readouterr().out
    with h5py.File(dst, "r") as f:
        d = f["1.1/frames"]
        assert np.array_equal(d[()], frames) and d.attrs["units"] == "counts"
        assert "gzip" not in d._filters and "32008" in str(d._filters)
        assert f["1.1/hard"].id == d.id and f.get("1.1/alias", getlink=True).path == "/1.1/frames"
        assert np.array_equal(f["1.1/vary"][()], np.arange(12.0).reshape(3, 4))
        assert f["1.1/title"][()] == b"old"
    assert writer_cli(["rewrite", str(src), str(dst)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert writer_cli(["rewrite", str(tmp_path / "none.h5"), str(tmp_path / "o.h5")]) == 2
    assert writer_cli(["rewrite", str(src), str(tmp_path / "o.h5"), "--compression", "zip"]) == 2
    assert "zip" in capsys.readouterr().err


def _virtual_datasets(f) -> dict:
    """Virtual datasets by path, also inside entries that are external links to each scan's
    own file (the shared layout, docs/files.md; visititems does not follow links)."""
    found = {}

    def visit(entry, name, link):  # a references stream's own file too (docs/files.md)
        if isinstance(link, (h5py.HardLink, h5py.ExternalLink)):
            obj = entry.get(name)
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                found[f"{entry.name[1:]}/{name}"] = obj[()]
    for entry in f:
        if isinstance(f[entry], h5py.Group):
            f[entry].visititems_links(lambda name, link, e=f[entry]: visit(e, name, link))
    return found


def _scan_file(path):
    """The file holding the data of the (first) scan of a shared file."""
    with h5py.File(path, "r", locking=False) as f:
        link = f.get(next(iter(f)), getlink=True)
    return path.parent / link.filename if isinstance(link, h5py.ExternalLink) else path


@pytest.mark.parametrize("absolute", [False, True])
def test_rewrite_into_another_folder_keeps_detector_frames(tmp_path, round_trips, capsys,
                                                           absolute):
    """The detector's own files stay where they are: a rewrite elsewhere still reads them."""
    a, _, _ = round_trips["external_frames"]
    out = tmp_path / "elsewhere" / "deeper" / "rewritten.h5"
    out.parent.mkdir(parents=True)
    args = ["rewrite", str(a), str(out)] + (["--absolute-sources"] if absolute else [])
    assert writer_cli(args) == 0
    assert "source names rewritten" in capsys.readouterr().out
    # both with locking=False: the two files share the detector's files, which HDF5 opens
    # once per process and refuses to reopen with another locking setting (docs/files.md)
    with h5py.File(a, "r", locking=False) as fa, h5py.File(out, "r", locking=False) as fo:
        frames = _virtual_datasets(fa)
        assert frames and all(v.sum() > 0 for v in frames.values())
        for name, values in frames.items():
            assert np.array_equal(fo[name][()], values), name
            names = {vs.file_name for vs in fo[name].virtual_sources()}
            assert all(n.startswith("/") == absolute for n in names), names
    assert validate_file(out).ok


def test_validate_reports_missing_virtual_sources(tmp_path, round_trips, capsys):
    a, _, _ = round_trips["external_frames"]
    # the scan alone in a file of its own (its frames' virtual dataset inside, relative
    # names), moved to another folder without the detector's files
    (tmp_path / "x" / "y").mkdir(parents=True)
    assert writer_cli(["rewrite", str(_scan_file(a)), str(tmp_path / "x" / "y" / "r.h5")]) == 0
    moved = tmp_path / "moved.h5"
    moved.write_bytes((tmp_path / "x" / "y" / "r.h5").read_bytes())
    report = validate_file(moved)
    assert not report.ok
    missing = [e for e in report.errors if "virtual dataset source" in e]
    assert missing and "eiger_0000.h5::/entry_0000/data is missing" in missing[0]
    assert writer_cli(["validate", str(moved)]) == 1
    assert "is missing" in capsys.readouterr().out
    # a rewrite of it says what it could not find, and keeps the names
    assert writer_cli(["rewrite", str(moved), str(tmp_path / "again.h5")]) == 0
    assert "eiger_0000.h5 (named by a virtual dataset" in capsys.readouterr().err


def test_rewrite_moves_relative_external_links(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    with h5py.File(tmp_path / "src" / "target.h5", "w") as f:
        f["values"] = np.arange(5)
    with h5py.File(tmp_path / "src" / "main.h5", "w") as f:
        f["link"] = h5py.ExternalLink("target.h5", "/values")
        f["self"] = h5py.ExternalLink("/nowhere/gone.h5", "/x")  # kept as named
    assert writer_cli(["rewrite", str(tmp_path / "src" / "main.h5"),
                       str(tmp_path / "out" / "main.h5")]) == 0
    with h5py.File(tmp_path / "out" / "main.h5", "r") as f:
        assert f.get("link", getlink=True).filename == "../src/target.h5"
        assert np.array_equal(f["link"][()], np.arange(5))
        assert f.get("self", getlink=True).filename == "/nowhere/gone.h5"


def test_rewrite_output_folder_must_exist(tmp_path, capsys):
    src = tmp_path / "in.h5"
    with h5py.File(src, "w") as f:
        f["x"] = 1
    (tmp_path / "file").write_text("")
    assert writer_cli(["rewrite", str(src), str(tmp_path / "file" / "o.h5")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert writer_cli(["rewrite", str(src), str(tmp_path / "nodir" / "o.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_replay_keeps_relative_virtual_sources_relative(round_trips):
    a, b, _ = round_trips["external_frames"]  # b: replayed into another folder
    with h5py.File(a, "r", locking=False) as fa, h5py.File(b, "r", locking=False) as fb:
        frames = _virtual_datasets(fa)
        for name, values in frames.items():
            names = {vs.file_name for vs in fb[name].virtual_sources()}
            assert names and not any(os.path.isabs(n) for n in names), names
            # relative to the folder of the file holding each virtual dataset
            b_dir, a_dir = (Path(f[name].file.filename).parent for f in (fb, fa))
            assert {os.path.normpath(b_dir / n) for n in names} == {
                os.path.normpath(a_dir / vs.file_name) for vs in fa[name].virtual_sources()}
            assert np.array_equal(fb[name][()], values)
