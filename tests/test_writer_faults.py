"""Storage faults on real file systems: a full disk and a folder the writer may not write.

A small tmpfs is mounted for the full disk (needs root, as in CI); a read-only mount (root)
or a read-only folder (other users) for the refused write. Each fault fails its scan with
the reason in Redis, keeps what was already durable readable, and the other scans go on.
"""

import os
import subprocess
import time

import h5py
import numpy as np
import pytest

from writer_helpers import durable_points, seed_scan, start_writer, wait_status


def mount_tmpfs(where, options):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


def unmount(where):
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "roots"
    root.mkdir()
    (root / "ok").mkdir()
    mounted = []
    yield root, mounted
    for where in mounted:
        unmount(where)


@pytest.fixture
def service(redis_url, roots, redis_client):
    service, thread = start_writer(redis_url, roots[0])
    time.sleep(0.1)
    yield service
    service.stop()
    thread.join(30)


def test_disk_full(store, roots, service):
    root, mounted = roots
    small = root / "small"
    mount_tmpfs(small, "size=4m")
    mounted.append(small)
    path = small / "full.h5"
    scan = store.create_scan({"session": "s", "name": "timescan", "number": 1, "path": str(path)},
                             info={"title": "fills the disk", "type": "timescan", "scan_nb": 1})
    cam = scan.create_stream("cam", "uint16", (256, 256))
    scan.prepare()
    scan.start()
    noise = np.random.default_rng(0).integers(0, 2**16, (80, 256, 256), dtype=np.uint16)
    cam.send(noise[:8])  # 1 MB: fits
    deadline = time.monotonic() + 10
    while durable_points(store, scan.key, "cam") < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    other, other_data = seed_scan(store, root / "ok" / "other.h5", number=2, close=False)
    cam.send(noise[8:])  # 9 MB more, incompressible: the disk fills
    st = wait_status(store, scan.key)
    assert st.state == "failed"
    assert "disk full (No space left on device)" in st.error and str(path) in st.error
    assert "8 points durable" in st.error
    other.close()
    assert wait_status(store, other.key).state == "done"  # the other scan went on
    with h5py.File(path, "r", locking=False) as f:  # what was durable stays readable
        assert np.array_equal(f["1.1/measurement/cam"][:8], noise[:8])
    assert durable_points(store, scan.key, "cam") >= 8


def test_folder_the_writer_may_not_write(store, roots, service):
    root, mounted = roots
    closed = root / "closed"
    if os.geteuid() == 0:  # root writes anywhere a mode allows nobody: a read-only mount
        mount_tmpfs(closed, "ro,size=1m")
        mounted.append(closed)
        expected = "Read-only file system"
    else:
        closed.mkdir()
        closed.chmod(0o555)
        expected = "Permission denied"
    path = closed / "x.h5"
    scan, _ = seed_scan(store, path, number=1)
    ok, _ = seed_scan(store, root / "ok" / "fine.h5", number=2)
    st = wait_status(store, scan.key)
    assert st.state == "failed" and expected in st.error and str(path) in st.error
    assert wait_status(store, ok.key).state == "done"
    assert not path.exists()
