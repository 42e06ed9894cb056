"""Mapping -> Layout -> NeXus skeleton, and the data-root rules, on real files."""

import os
import time

import h5py
import pytest

from writer.scan.mapping import MappingError, parse_mapping
from writer.scan.nexus_skeleton import EntryExistsError, finalize_entry, write_entry
from writer.hdf5.paths import PathRefused, check_link_target, resolve_scan_file
from writer_helpers import SEED_MAPPING, SEED_STREAMS

ENTRY = {"NX_class": "NXentry"}


@pytest.mark.parametrize("mapping, where, what", [
    ([ENTRY, {"d": [{}, "STRAEM", "x"]}], "/d", "STRAEM"),
    ([ENTRY, {"g": [{}, {"a/b": [{}, "RAW", 1]}]}], "/g", "a/b"),
    ([ENTRY, {"g": [{}, {"x": [{}, "SOFT_LINK", "relative"]}]}], "/g/x", "relative"),
    ([ENTRY, {"g": [{}, {"x": [{"u": {"nested": 1}}, "RAW", 1]}]}], "/g/x", "attrs"),
    ([ENTRY, {"x": [{}, "EXTERNAL_LINK", {"file": "f.h5"}]}], "/x", "path"),
    ([ENTRY, {"x": [{}, "STREAM", 3]}], "/x", "3"),
    ([ENTRY, {"x": [{}, "RAW", 1, "extra"]}], "/x", ""),
    ([ENTRY], "/", ""),
    ("not a list", "/", ""),
])
def test_malformed_mappings_name_the_path(mapping, where, what):
    with pytest.raises(MappingError) as info:
        parse_mapping(mapping)
    message = str(info.value)
    assert message.startswith(f"mapping {where}"), message
    assert what in message


def test_semantic_errors():
    with pytest.raises(MappingError, match="/d.*'no:such'.*not a stream"):
        parse_mapping([ENTRY, {"d": [{}, "STREAM", "no:such"]}], stream_names={"a"})
    with pytest.raises(MappingError, match="/l.*'/nowhere'.*not a node"):
        parse_mapping([ENTRY, {"l": [{}, "SOFT_LINK", "/nowhere"]}])


def test_seed_mapping_layout_and_inferred_plot():
    layout = parse_mapping(SEED_MAPPING, stream_names=set(SEED_STREAMS))
    assert [g.path for g in layout.groups][:2] == ["/instrument", "/instrument/diode"]
    assert layout.stream_paths(SEED_STREAMS[0]) == ["/instrument/diode/data",
                                                    "/measurement/diode"]
    plot = layout.default_plot
    assert plot.create and plot.signal == "diode" and plot.axes == ["elapsed_time"]


def test_mapping_nxdata_is_used():
    mapping = [ENTRY, {
        "instrument": [{"NX_class": "NXinstrument"}, {
            "det": [{"NX_class": "NXdetector"}, {"data": [{}, "STREAM", "det"]}]}],
        "scan_data": [{"NX_class": "NXdata", "signal": "det"}, {
            "det": [{}, "SOFT_LINK", "/instrument/det/data"]}]}]
    plot = parse_mapping(mapping).default_plot
    assert plot.path == "/scan_data" and plot.signal == "det" and not plot.create


def test_skeleton_written(tmp_path):
    layout = parse_mapping(SEED_MAPPING)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        entry = write_entry(f, "7.1", layout, {"title": "ascan", "start_time": "2026-11-24T10:00"},
                            {SEED_STREAMS[0]: 1})
        finalize_entry(entry, {"end_time": "2026-11-24T10:05"}, "SUCCESS")
        with pytest.raises(EntryExistsError, match="7.1.*never overwrites"):
            write_entry(f, "7.1", layout, {})
    with h5py.File(path, "r") as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "7.1"
        e = f["7.1"]
        assert e.attrs["default"] == "plot"
        assert e["plot"].attrs["signal"] == "diode"
        assert list(e["plot"].attrs["axes"]) == ["elapsed_time"]
        assert e["instrument/name"][()] == b"esrf-id00a"
        assert e["title"][()] == b"ascan" and e["end_reason"][()] == b"SUCCESS"
        assert e.get("plot/diode", getlink=True).path == "/7.1/instrument/diode/data"


def test_raw_values_and_links(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["data"] = [1, 2, 3]
    mapping = [ENTRY, {
        "text": [{"units": "mm", "list": ["a", "b"]}, "RAW", "hello"],
        "matrix": [{}, "RAW", [[1, 2], [3, 4]]],
        "flag": [{}, "RAW", True],
        "strings": [{}, "RAW", ["x", "yy"]],
        "ragged": [{}, "RAW", [[1], [2, 3]]],
        "soft": [{}, "SOFT_LINK", "/matrix"],
        "ext": [{}, "EXTERNAL_LINK", {"file": "other.h5", "path": "/data"}]}]
    with h5py.File(tmp_path / "s.h5", "w") as f:
        write_entry(f, "1.1", parse_mapping(mapping), {})
    with h5py.File(tmp_path / "s.h5", "r") as f:
        e = f["1.1"]
        assert e["text"][()] == b"hello" and e["text"].attrs["units"] == "mm"
        assert list(e["text"].attrs["list"]) == ["a", "b"]
        assert e["matrix"][()].tolist() == [[1, 2], [3, 4]]
        assert bool(e["flag"][()]) is True
        assert [s.decode() for s in e["strings"][()]] == ["x", "yy"]
        assert e["ragged"][()] == b"[[1], [2, 3]]"  # kept as JSON text
        assert e["soft"][()].tolist() == [[1, 2], [3, 4]]
        assert e["ext"][()].tolist() == [1, 2, 3]


def test_ten_thousand_nodes(tmp_path):
    mapping = [ENTRY, {f"g{i}": [{"NX_class": "NXpositioner"}, {
        f"d{j}": [{"units": "mm"} if j % 2 else {}, "RAW", 1.5 if j % 2 else "text"]
        for j in range(4)}] for i in range(2000)}]
    t0 = time.perf_counter()
    layout = parse_mapping(mapping)
    with h5py.File(tmp_path / "big.h5", "w") as f:
        write_entry(f, "1.1", layout, {})
    print(f"10,000-node mapping: parse + skeleton {time.perf_counter() - t0:.2f} s")
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert len(f["1.1"]) == 2000  # no stream: no plot to infer
        assert f["1.1/g1999/d3"].attrs["units"] == "mm"


def test_paths_inside_and_outside_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_scan_file(str(root / "sub" / "a.h5"), [str(root)]) == root / "sub" / "a.h5"
    assert resolve_scan_file(f"{root}/sub/../b.h5", [str(root)]) == root / "b.h5"
    with pytest.raises(PathRefused, match="relative"):
        resolve_scan_file("sub/a.h5", [str(root)])
    with pytest.raises(PathRefused, match="outside the data roots"):
        resolve_scan_file(f"{root}/../outside/a.h5", [str(root)])
    os.symlink(outside, root / "escape")
    with pytest.raises(PathRefused, match="resolves to"):
        resolve_scan_file(str(root / "escape" / "a.h5"), [str(root)])
    (root / "sub" / "dir.h5").mkdir()
    with pytest.raises(PathRefused, match="not a regular file"):
        resolve_scan_file(str(root / "sub" / "dir.h5"), [str(root)])
    with pytest.raises(PathRefused, match="does not exist"):
        resolve_scan_file(str(root / "a.h5"), [str(tmp_path / "missing-root")])
    scan_file = str(root / "sub" / "scan.h5")
    assert check_link_target("frames.h5", scan_file, [str(root)]) == root / "sub" / "frames.h5"
    with pytest.raises(PathRefused, match="linked file"):
        check_link_target("../../outside/f.h5", scan_file, [str(root)])
