"""The writer's memory stays within its budget when it is behind: the backlog waits in Redis."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from blissdata import keys
from writer_helpers import durable_points, wait_status

MB = 2**20


def rss(pid, field="VmRSS") -> int:
    """Resident memory of a process in bytes (VmHWM: its peak so far)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def test_backlog_much_larger_than_budget(store, tmp_path):
    data_root = tmp_path / "data"
    data_root.mkdir()
    budget_mb = 24
    config = tmp_path / "writer.toml"
    config.write_text(f'data_roots = ["{data_root}"]\nmemory_budget_mb = {budget_mb}\n')
    log_path = tmp_path / "writer.log"
    proc = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
                             "--redis", store.url], stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)
    try:
        path = data_root / "backlog.h5"
        scan = store.create_scan({"session": "s", "name": "timescan", "number": 1,
                                  "path": str(path)},
                                 info={"title": "backlog", "type": "timescan", "scan_nb": 1})
        cam = scan.create_stream("cam", "uint16", (512, 512))
        scan.prepare()
        scan.start()
        deadline = time.monotonic() + 15
        while store.redis.hget(keys.writer_key(scan.key), "status") is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        time.sleep(0.3)  # its entry is open, its reader waiting
        # the disk "stops": the writer is frozen while 25x its budget is published
        os.kill(proc.pid, signal.SIGSTOP)
        before = rss(proc.pid)
        rng = np.random.default_rng(0)
        frames = rng.poisson(50, (8, 512, 512)).astype(np.uint16)
        n = 1200  # 630 MB
        for i in range(0, n, 8):
            cam.send(frames + np.uint16(i))
        os.kill(proc.pid, signal.SIGCONT)
        scan.close()
        deadline = time.monotonic() + 120
        while durable_points(store, scan.key, "cam") < n:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        peak = rss(proc.pid, "VmHWM")
        assert wait_status(store, scan.key).state == "done"
    finally:
        proc.terminate()
        proc.wait(30)
    growth = peak - before
    print(f"writer peak RSS growth {growth / MB:.0f} MB for a {n * 512 * 512 * 2 / MB:.0f} MB "
          f"backlog, budget {budget_mb} MB")
    # the budget bounds the data held; the client's socket buffers and the allocator add
    # their share (reading the whole backlog at once grows it by the backlog, ~600 MB)
    assert growth < 3 * budget_mb * MB, f"writer grew by {growth / MB:.0f} MB"
    with h5py.File(path, "r", locking=False) as f:
        d = f["1.1/measurement/cam"]
        assert d.shape == (n, 512, 512)
        for i in (0, 8, 600, n - 8):  # every batch kept its place
            assert np.array_equal(d[i:i + 8], frames + np.uint16(i))
