"""The h5py-like view: before the file exists, while it is written, and after."""

import threading
import time

import h5py
import numpy as np
import pytest

from blissdata.h5api import File
from blissdata.memory_tracker import MemoryTracker
from writer_helpers import SEED_STREAMS, seed_scan, start_writer, wait_status


def test_before_the_file_exists(store, tmp_path):
    path = tmp_path / "never.h5"
    scan, data = seed_scan(store, path, npoints=12, close=False)
    f = File(store, str(path))
    assert not path.exists()
    assert list(f) == ["1.1"]
    diode = f["/measurement/diode"]  # entry-relative, as in the mapping
    assert diode.shape == (12,) and diode.dtype == np.float64
    assert np.array_equal(diode[2:5], data[SEED_STREAMS[0]][2:5])
    assert np.array_equal(f["/1.1/instrument/diode/data"][()], data[SEED_STREAMS[0]])
    assert f["/instrument/name"][()] == b"esrf-id00a"  # as h5py reads it from the file
    assert f["/instrument/name"].asstr()[()] == "esrf-id00a"
    assert f["/instrument/name"].attrs["short_name"] == "id00"
    assert f["/instrument"].attrs["NX_class"] == "NXinstrument"
    assert sorted(f["/instrument"].keys())[:2] == ["diode", "elapsed_time"]
    assert f["1.1/title"][()] == b"ascan roby 0 1 12 0.1"
    assert "/instrument/diode/data" in f and "/nope" not in f
    values = []
    reader = threading.Thread(target=lambda: values.extend(f["/measurement/diode"]))
    reader.start()  # iteration follows the scan live
    time.sleep(0.2)
    scan.close()
    reader.join(10)
    assert values == list(data[SEED_STREAMS[0]])


def test_while_written_trimmed_and_after(store, redis_url, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    service, thread = start_writer(redis_url, root)
    try:
        time.sleep(0.1)
        path = root / "live.h5"
        scan, data = seed_scan(store, path, npoints=50)
        assert wait_status(store, scan.key).state == "done"
        MemoryTracker(store, budget_bytes=1, hard_limit_bytes=2**40).step()  # trim it all
        f = File(store, str(path))
        assert np.array_equal(f["/instrument/epoch/value"][:], data[SEED_STREAMS[2]])
        assert np.array_equal(f["/measurement/elapsed_time"][10:20],
                              data[SEED_STREAMS[1]][10:20])
        live = _as_read(f)
        store.delete_scan(scan.key)  # gone from Redis: the file itself
        with File(store, str(path)) as archived:
            assert _as_read(archived) == live  # one script, the same values and types
            assert isinstance(archived["/1.1/measurement/diode"], h5py.Dataset)
            assert np.array_equal(archived["/1.1/measurement/diode"][()],
                                  data[SEED_STREAMS[0]])
            # entry-relative paths read the same as while the scan was live
            assert np.array_equal(archived["/measurement/elapsed_time"][10:20],
                                  data[SEED_STREAMS[1]][10:20])
            assert list(archived) == ["1.1"] and "instrument/epoch" in archived["1.1"]
        with pytest.raises(KeyError, match="no entry '2.1'.*1.1"):
            File(store, str(path), entry="2.1")
    finally:
        service.stop()
        thread.join(20)


def test_unknown_file_and_entry(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no scan of"):
        File(store, str(tmp_path / "nothing.h5"))
    seed_scan(store, tmp_path / "x.h5", npoints=3)
    with pytest.raises(KeyError, match="no entry '9.1'"):
        File(store, str(tmp_path / "x.h5"), entry="9.1")
    with pytest.raises(KeyError):
        File(store, str(tmp_path / "x.h5"))["/measurement/nothing"]


def _as_read(f) -> dict:
    """What a script sees of a few nodes: values with their Python types, dtypes, shapes,
    attributes."""
    seen = {}
    for path in ("/instrument/name", "/1.1/title", "/instrument", "/measurement/diode",
                 "/instrument/diode/data"):
        node = f[path]
        attrs = {k: (type(v).__name__, np.asarray(v).tolist()) for k, v in node.attrs.items()}
        if hasattr(node, "keys"):
            seen[path] = ("group", attrs)
            continue
        value = node[()]
        seen[path] = (type(value).__name__, np.asarray(value).tolist(), str(node.dtype),
                      node.shape, attrs)
    seen["asstr"] = f["/instrument/name"].asstr()[()]
    return seen
