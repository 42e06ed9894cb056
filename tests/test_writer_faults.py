"""Storage faults on real file systems: a full disk and a folder the writer may not write.

A small tmpfs is mounted for the full disk (needs root, as in CI); a read-only mount (root)
or a read-only folder (other users) for the refused write. Each fault fails its scan with
the reason in Redis, keeps what was already durable readable, and the other scans go on.
"""

import errno
import os
import re
import subprocess
import time

import h5py
import numpy as np
import pytest

from writer.hdf5.os_errors import is_file_error, os_reason
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
    service, thread = start_writer(redis_url, roots[0], disk_reserve_mb=0.5)  # disks of 4 MB
    time.sleep(0.1)
    yield service
    service.stop()
    thread.join(30)


def camera_scan_on_small_disk(store, roots, frame_shape, nframes, seed):
    """A scan writing to a fresh 4 MB tmpfs, its first 8 frames (of `nframes` of noise)
    already durable: (scan, camera stream, frames, file path, the tmpfs folder)."""
    root, mounted = roots
    small = root / "small"
    mount_tmpfs(small, "size=4m")
    mounted.append(small)
    path = small / "full.h5"
    scan = store.create_scan({"session": "s", "name": "timescan", "number": 1, "path": str(path)},
                             info={"title": "small disk", "type": "timescan", "scan_nb": 1})
    cam = scan.create_stream("cam", "uint16", frame_shape)
    scan.prepare()
    scan.start()
    noise = np.random.default_rng(seed).integers(0, 2**16, (nframes, *frame_shape),
                                                 dtype=np.uint16)
    cam.send(noise[:8])
    deadline = time.monotonic() + 10
    while durable_points(store, scan.key, "cam") < 8:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return scan, cam, noise, path, small


def test_disk_full(store, roots, service):
    root, _ = roots
    scan, cam, noise, path, small = camera_scan_on_small_disk(store, roots, (256, 256), 80, 0)
    other, other_data = seed_scan(store, root / "ok" / "other.h5", number=2, close=False)
    cam.send(noise[8:])  # 9 MB more, incompressible: the disk would fill
    st = wait_status(store, scan.key)
    assert st.state == "failed"
    assert st.error.startswith("disk full: no room for the next ")
    assert "disk_reserve_mb" in st.error and str(path) in st.error
    kept = int(re.search(r"(\d+) points kept", st.error).group(1))
    assert 8 <= kept < 80
    other.close()
    assert wait_status(store, other.key).state == "done"  # the other scan went on
    with h5py.File(path, "r", locking=False) as f:  # what was kept is readable
        assert np.array_equal(f["1.1/measurement/cam"][()], noise[:kept])
    assert durable_points(store, scan.key, "cam") == kept


def fill(folder):
    """Another program takes every byte left on the file system of `folder`."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_disk_filled_by_another_program(store, roots, service):
    """Another program takes every byte left: the writer cannot reserve room for the next
    writes and fails the scan while the room it reserved before lets HDF5 close the file
    cleanly. The points kept read back, and the writer goes on."""
    root, _ = roots
    scan, cam, noise, path, small = camera_scan_on_small_disk(store, roots, (64, 64), 400, 1)
    fill(small)
    cam.send(noise[8:])
    scan.stop()
    scan.close()
    st = wait_status(store, scan.key)
    assert st.state == "failed"
    assert st.error.startswith("disk full: no room") and str(path) in st.error
    assert "8 points kept" in st.error
    other, _ = seed_scan(store, root / "ok" / "other.h5", number=2)
    assert wait_status(store, other.key).state == "done"  # the writer went on
    (small / "filler").unlink()
    with h5py.File(path, "r", locking=False) as f:  # what was durable stays readable
        assert np.array_equal(f["1.1/measurement/cam"][:8], noise[:8])


def test_disk_full_with_the_reserve_off(store, roots, redis_url):
    """disk_reserve_mb = 0: the writer runs into the full disk itself (HDF5's write or
    flush fails with ENOSPC; h5py raises OSError for some, RuntimeError for others). The
    scan fails with that reason and the points durable before, and the writer goes on.
    (Whether the file stays readable is then up to where HDF5's flush was cut: the reason
    the reserve is on by default.)"""
    root, _ = roots
    service, thread = start_writer(redis_url, root, disk_reserve_mb=0)
    try:
        scan, cam, noise, path, small = camera_scan_on_small_disk(store, roots, (256, 256),
                                                                  80, 2)
        cam.send(noise[8:])
        st = wait_status(store, scan.key)
        assert st.state == "failed"
        assert "disk full (No space left on device)" in st.error and str(path) in st.error
        kept = durable_points(store, scan.key, "cam")
        assert 8 <= kept < 80 and f"{kept} points" in st.error, (kept, st.error)
        other, _ = seed_scan(store, root / "ok" / "other.h5", number=2)
        assert wait_status(store, other.key).state == "done"  # the writer went on
    finally:
        service.stop()
        thread.join(30)


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


def test_file_errors_in_a_few_words():
    """HDF5's messages run over lines; users get the system's few words. h5py raises
    RuntimeError for a failed flush, the errno only inside the message."""
    flush = RuntimeError("Unable to flush file (file write failed: time = Sun Nov 29 07:48:56 "
                         "2026\n, filename = 'x.h5', file descriptor = 31, errno = 28, error "
                         "message = 'No space left on device', buf = 0x7f, total write size "
                         "= 720)")
    assert is_file_error(flush) and os_reason(flush) == "disk full (No space left on device)"
    assert os_reason(OSError(errno.EDQUOT, "quota")) == "disk full (Disk quota exceeded)"
    assert os_reason(OSError(errno.EROFS, "ro")) == "Read-only file system"
    assert os_reason(OSError("no errno\nsecond line")) == "no errno"
    assert not is_file_error(RuntimeError("a bug, not the disk"))
