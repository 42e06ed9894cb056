"""The write path's cost follows the data: a file holds its data and HDF5's metadata (nothing
left behind by rewritten chunks), its size does not depend on the pace the data came at, and
the writer's memory stays within its budget with a thousand channels. (CPU and lag: in
bench/bench_write_cost.py, not here.)"""

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from blissdata import keys
from writer.hdf5.file_space import file_space
from writer_helpers import durable_points, start_writer, wait_status

MB = 2**20


def publish(store, path, number, channels, npoints, batch, pause_s, count_time=None,
            announce_npoints=True):
    """A scan of `channels` float64 counters (values a counter could give: they compress),
    `npoints` points sent `batch` at a time, `pause_s` apart (`npoints` in the header unless
    `announce_npoints` is False). Returns (scan, the data)."""
    info = {"title": "cost", "type": "ascan", "scan_nb": number}
    if announce_npoints:
        info["npoints"] = npoints
    if count_time:
        info["count_time"] = count_time
    scan = store.create_scan({"session": "cost", "name": "ascan", "number": number,
                              "path": str(path)}, info=info)
    streams = [scan.create_stream(f"ct{c}", "float64") for c in range(channels)]
    scan.prepare()
    scan.start()
    data = np.round(1000 + 50 * np.sin(np.arange(npoints)[None, :] * 0.01
                                       + np.arange(channels)[:, None]), 1)
    for start in range(0, npoints, batch):
        scan.send_many({s: data[c, start:start + batch] for c, s in enumerate(streams)})
        if pause_s:
            time.sleep(pause_s)
    scan.close()
    return scan, data


def scan_file(store, scan_key) -> str:
    """The scan's own file, where its data is (docs/files.md)."""
    watermark = next(iter(store.redis.hgetall(keys.durable_key(scan_key)).values()))
    return json.loads(watermark)["file"]


@pytest.fixture
def writer(store, tmp_path):
    service, thread = start_writer(store.url, tmp_path)
    yield service
    service.stop()
    thread.join(10)


# The files are big enough for HDF5's metadata written in SWMR mode (object headers updated
# in place, ~100-250 bytes per dataset more than the copy packs them in) to stay under 2 %;
# a few hundred kB file of 64 datasets has 3-6 % of such bytes (measured).
LOADS = {  # channels, points, batch, pause between batches, count_time in the header
    "slow": (64, 1500, 25, 0.05, 0.05),  # every chunk flushed partially, many times
    "fast": (64, 20_000, 100, 0, 0.001),
    "no count_time": (16, 3000, 30, 0.01, None),
}


@pytest.mark.parametrize("load", LOADS)
def test_file_holds_data_and_metadata_only(store, tmp_path, writer, load):
    channels, npoints, batch, pause, count_time = LOADS[load]
    scan, data = publish(store, tmp_path / "cost.h5", 1, channels, npoints, batch, pause,
                         count_time)
    assert wait_status(store, scan.key, timeout=60).state == "done"
    path = scan_file(store, scan.key)
    space = file_space(path, tmp_path)
    print(load, space, f"{100 * space.outside_share:.2f} % outside")
    assert space.outside_share <= 0.02, space
    with h5py.File(path, "r") as f:
        for c in (0, channels - 1):
            assert np.array_equal(f[f"1.1/measurement/ct{c}"][:], data[c])


def test_scan_of_unknown_length_allocates_what_it_holds(store, tmp_path, writer):
    """No npoints nor count_time in the header (a timescan stopped by hand): the datasets
    take the space of their points, not of whole chunks sized for a long scan (64 counters
    x 1000 points took 64 MiB for 0.5 MB once: get_storage_size counts a chunk whole)."""
    scan, data = publish(store, tmp_path / "timescan.h5", 1, 64, 1000, 50, 0.01,
                         announce_npoints=False)
    assert wait_status(store, scan.key, timeout=60).state == "done"
    space = file_space(scan_file(store, scan.key), tmp_path)
    assert space.stored <= 1.1 * data.nbytes, (space, data.nbytes)  # + the header, the note
    assert space.size <= 1.5 * data.nbytes, (space, data.nbytes)  # with HDF5's metadata


def test_several_scans_in_the_shared_file(store, tmp_path, writer):
    shared = tmp_path / "sample.h5"
    for number in (1, 2, 3):
        scan, _ = publish(store, shared, number, 32, 3000, 100, 0.02, 0.1)
        assert wait_status(store, scan.key, timeout=60).state == "done"
        space = file_space(scan_file(store, scan.key), tmp_path)
        assert space.outside_share <= 0.02, (number, space)
    space = file_space(shared, tmp_path)  # the links to each scan's file
    assert space.stored == 0 and space.outside_share <= 0.02, space
    with h5py.File(shared, "r") as f:
        assert sorted(f) == ["1.1", "2.1", "3.1"]


def test_same_data_same_size_whatever_the_pace(store, tmp_path, writer):
    """Sent point by point with pauses (every chunk flushed partially many times) or all at
    once (chunks complete at the first flush): the same bytes on disk, within 1 %."""
    sizes = []
    for number, (batch, pause) in enumerate([(5, 0.02), (4000, 0)], start=1):
        scan, _ = publish(store, tmp_path / f"pace{number}.h5", number, 16, 4000, batch, pause,
                          0.01)
        assert wait_status(store, scan.key, timeout=60).state == "done"
        sizes.append(file_space(scan_file(store, scan.key), tmp_path).size)
    assert abs(sizes[0] - sizes[1]) <= 0.01 * min(sizes), sizes


def peak_rss(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_thousand_channels_within_memory_budget(store, tmp_path):
    """1024 float64 channels, no npoints in the header (the biggest chunks): the writer
    process's peak RSS stays under memory_budget_mb (each channel held a chunk's worth,
    1 MiB, before)."""
    data_root = tmp_path / "data"
    data_root.mkdir()
    budget_mb = 512
    config = tmp_path / "writer.toml"
    config.write_text(f'data_roots = ["{data_root}"]\nmemory_budget_mb = {budget_mb}\n'
                      'max_lag_s = 0.5\n')
    log_path = tmp_path / "writer.log"
    proc = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
                             "--redis", store.url], stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        scan = store.create_scan({"session": "s", "name": "ct", "number": 1,
                                  "path": str(data_root / "many.h5")},
                                 info={"title": "many", "type": "timescan", "scan_nb": 1})
        streams = [scan.create_stream(f"ch{c}", "float64") for c in range(1024)]
        scan.prepare()
        scan.start()
        values = np.arange(100, dtype=np.float64)
        n = 1500
        for i in range(0, n, 100):
            scan.send_many({s: values + i for s in streams})
            time.sleep(0.2)  # the writer flushes partial chunks in between
        scan.close()
        deadline = time.monotonic() + 120
        while durable_points(store, scan.key, "ch1023") < n:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        peak = peak_rss(proc.pid)
        assert wait_status(store, scan.key, timeout=60).state == "done"
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"writer peak RSS {peak / MB:.0f} MB with 1024 channels, budget {budget_mb} MB")
    assert peak < budget_mb * MB
    with h5py.File(scan_file(store, scan.key), "r") as f:
        assert np.array_equal(f["1.1/measurement/ch1023"][:], np.arange(n, dtype=np.float64))
