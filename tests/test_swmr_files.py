"""The pieces of the SWMR layout (docs/files.md): clearing the flags a writer killed -9 leaves,
partial chunks stored so that no byte a reader may read changes, the shared file replaced
atomically."""

import os
import subprocess
import sys
import time

import h5py
import hdf5plugin  # noqa: F401
import numpy as np
import pytest

from writer.hdf5.dataset_writer import DatasetAppender
from writer.hdf5.shared_file import link_entry, scan_file_in
from writer.hdf5.superblock import clear_write_flags, lookup3

KILLED_WRITER = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "w", libver="latest")
f.create_dataset("x", data=[1.0, 2.0, 3.0], maxshape=(None,), chunks=(4,))
f.swmr_mode = True
f["x"].resize(5, axis=0)
f.flush()
print("ready", flush=True)
time.sleep(60)
"""


def test_lookup3_is_hdf5s_checksum(tmp_path):
    path = tmp_path / "a.h5"
    h5py.File(path, "w", libver="latest").close()
    block = path.read_bytes()[:48]
    assert lookup3(block[:44]) == int.from_bytes(block[44:48], "little")


def test_clear_write_flags_after_kill_9(tmp_path):
    path = tmp_path / "killed.h5"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    with pytest.raises(OSError, match="already open for write"):
        h5py.File(path, "r")
    with h5py.File(path, "r", swmr=True) as f:  # what a reader can always do
        assert f["x"].shape == (5,)
    assert clear_write_flags(path) is True
    with h5py.File(path, "r+") as f:
        assert list(f["x"][:3]) == [1.0, 2.0, 3.0] and f["x"].shape == (5,)
    assert clear_write_flags(path) is False  # nothing left to clear


def test_clear_write_flags_refuses_what_it_cannot_fix(tmp_path):
    old = tmp_path / "old.h5"
    h5py.File(old, "w").close()  # superblock version 0: no flags byte
    with pytest.raises(ValueError, match="superblock version 0"):
        clear_write_flags(old)
    text = tmp_path / "text.h5"
    text.write_text("not HDF5")
    with pytest.raises(ValueError, match="no HDF5 superblock"):
        clear_write_flags(text)
    broken = tmp_path / "broken.h5"
    h5py.File(broken, "w", libver="latest").close()
    data = bytearray(broken.read_bytes())
    data[20] ^= 0xFF  # inside the superblock: its checksum no longer matches
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        clear_write_flags(broken)


CONCURRENT_READER = """
import os, sys, h5py, hdf5plugin, numpy as np
path, done = sys.argv[1:3]
f = h5py.File(path, "r", swmr=True, locking=False)
open(done + ".started", "w").close()
d, reads, bad = f["x"], 0, []
while not os.path.exists(done):
    d.refresh()
    n = d.shape[0]
    if n:
        got = d[:n]
        if not np.array_equal(got, np.sin(np.arange(n) * 0.01)):
            bad.append(n)
        reads += 1
print(reads, bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("compression", ["bitshuffle-lz4", "gzip", "zstd"])
def test_swmr_partial_chunks_never_overwritten_compressed(tmp_path, compression):
    """One point per flush, as at a slow rate: every flush stores the partial chunk; every
    value reads back right (in this process, and in another), the file stays bounded."""
    path = tmp_path / "slow.h5"
    done = tmp_path / "done"
    f = h5py.File(path, "w", libver="latest", locking=False)
    app = DatasetAppender(f, "x", "float64", compression=compression, workers=0)
    f.swmr_mode = True
    f.flush()
    reader = subprocess.Popen([sys.executable, "-c", CONCURRENT_READER, str(path), str(done)],
                              stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60  # the flushes below take well under a second now
    while not (tmp_path / "done.started").exists():
        assert time.monotonic() < deadline and reader.poll() is None, "reader did not start"
        time.sleep(0.01)
    values = np.sin(np.arange(600) * 0.01)
    raw_chunk = 8 * app.chunks[0]
    for i, v in enumerate(values):
        app.append(values[i:i + 1])
        assert app.flush() == i + 1
        f.flush()
        if i % 37 == 0:
            assert np.array_equal(f["x"][:i + 1], values[:i + 1])
    done.touch()
    out, _ = reader.communicate(timeout=60)
    assert reader.returncode == 0, out  # a reader in another process all along: all right
    assert int(out.split()[0]) > 0, out
    assert np.array_equal(f["x"][:], values)
    mask = f["x"].id.read_direct_chunk((0,))[0]
    assert mask != 0  # raw from its first flush, rewritten in place
    # nothing left behind: the raw chunk itself and HDF5's metadata
    assert os.path.getsize(path) < raw_chunk + 64 * 1024
    code = (f"import h5py, hdf5plugin, numpy as np\nf = h5py.File({str(path)!r}, 'r', "
            "swmr=True, locking=False)\nprint(repr(f['x'][:].tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert np.array_equal(np.array(eval(out)), values)
    app.close()
    f.close()


def test_swmr_chunk_filled_fast_stays_compressed(tmp_path):
    """A chunk that fills between two flushes is stored compressed; one flushed partially
    stays raw when it fills (a compressed version would leave the raw one behind)."""
    path = tmp_path / "fast.h5"
    with h5py.File(path, "w", libver="latest", locking=False) as f:
        app = DatasetAppender(f, "x", "float64", workers=0)
        f.swmr_mode = True
        n = app.chunks[0]
        data = np.arange(2 * n + 10, dtype=np.float64)
        app.append(data[:100])
        app.flush()
        app.append(data[100:])  # the first chunk fills (raw), the second fills at once
        app.flush()
        assert f["x"].id.read_direct_chunk((0,))[0] != 0
        assert f["x"].id.read_direct_chunk((n,))[0] == 0
        assert np.array_equal(f["x"][:], data)
        app.close()
        stored = f["x"].id.get_storage_size()
    assert stored < 2 * 8 * n + 8 * n // 2  # first and last raw, the second compressed
    assert os.path.getsize(path) < stored + 64 * 1024  # nothing left behind


def test_shared_file_replaced_whole(tmp_path):
    master = tmp_path / "sample.h5"
    for n in (1, 2):
        scan_file = scan_file_in(master, f"{n}.1")
        scan_file.parent.mkdir(exist_ok=True)
        with h5py.File(scan_file, "w", libver="latest") as f:
            f.create_group(f"{n}.1").attrs["NX_class"] = "NXentry"
            f[f"{n}.1/value"] = n
        if n == 1:
            link_entry(master, "1.1", scan_file)
            reader = h5py.File(master, "r", swmr=True, locking=False)  # the first version
        else:
            link_entry(master, "2.1", scan_file)
    assert list(reader) == ["1.1"] and reader["1.1/value"][()] == 1  # still whole
    reader.close()
    with h5py.File(master, "r", swmr=True) as f:
        assert sorted(f) == ["1.1", "2.1"] and f["2.1/value"][()] == 2
        assert f.attrs["default"] == "2.1" and f.attrs["NX_class"] == "NXroot"
        assert f.get("2.1", getlink=True).filename == "sample/sample_2.1.h5"  # relative
    link_entry(master, "2.1", scan_file_in(master, "2.1"))  # again: nothing changes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_shared_file_of_an_older_writer_gets_links_in_place(tmp_path):
    master = tmp_path / "old.h5"
    with h5py.File(master, "w") as f:
        f.create_group("1.1")["value"] = 1
    scan_file = scan_file_in(master, "2.1")
    scan_file.parent.mkdir()
    with h5py.File(scan_file, "w", libver="latest") as f:
        f.create_group("2.1")["value"] = 2
    link_entry(master, "2.1", scan_file)
    with h5py.File(master, "r") as f:
        assert f["1.1/value"][()] == 1 and f["2.1/value"][()] == 2


def test_rewrite_of_a_shared_file_rewrites_its_scans(tmp_path):
    from writer.commands.rewrite import rewrite

    master = tmp_path / "sample.h5"
    scan_file = scan_file_in(master, "1.1")
    scan_file.parent.mkdir()
    with h5py.File(scan_file, "w", libver="latest") as f:
        f.create_group("1.1").create_dataset("x", data=np.arange(1000.0), chunks=(100,),
                                              compression="gzip")
    link_entry(master, "1.1", scan_file)
    out = tmp_path / "out.h5"
    rewrite(str(master), str(out), compression="bitshuffle-lz4")
    with h5py.File(out, "r") as f:
        assert isinstance(f.get("1.1", getlink=True), h5py.HardLink)  # the data, not a link
        assert np.array_equal(f["1.1/x"][()], np.arange(1000.0))


OUR_WRITER = """
import sys, time
from pathlib import Path
from writer.hdf5.files import OpenFiles
handle = OpenFiles().acquire(Path(sys.argv[1]))
handle.h5.create_dataset("1.1/x", data=[1.0, 2.0, 3.0], maxshape=(None,), chunks=(4,))
handle.start_swmr()
handle.h5.flush()
print("ready", flush=True)
time.sleep(60)
"""

OTHER_PROGRAM_APPENDS = """
import sys, h5py
try:
    h5py.File(sys.argv[1], "a").close()
except OSError as exc:
    print("refused:", str(exc).splitlines()[0])
    sys.exit(3)
"""


def _started(script, *args, env=None):
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_second_writer_is_kept_out_but_readers_are_not(tmp_path):
    """The writer holds a lock file beside the data file, not HDF5's lock on it (dropped once
    SWMR writing starts, as HDF5's own SWMR writer does): another writer of ours, also one
    resuming, is refused; another HDF5 program appending (HDF5's locking on or off) is
    refused by the file's "open for writing" flags; SWMR readers with HDF5's default
    locking read. Killed -9, the writer's lock goes with it: a resume clears the flags."""
    from writer.hdf5.files import OpenFiles
    from writer.hdf5.locks import FileLockedError, lock_file_of

    path = tmp_path / "scan.h5"
    writer = _started(OUR_WRITER, path)
    try:
        assert lock_file_of(path).exists()
        for resume in (False, True):
            with pytest.raises(FileLockedError, match="another writer has it open"):
                OpenFiles().acquire(path, resume=resume)
        for env in ({}, {"HDF5_USE_FILE_LOCKING": "FALSE"}):
            other = subprocess.run([sys.executable, "-c", OTHER_PROGRAM_APPENDS, str(path)],
                                   capture_output=True, text=True, env={**os.environ, **env})
            assert other.returncode == 3 and "already open for write" in other.stdout, other
        with h5py.File(path, "r", swmr=True) as f:  # HDF5's default locking
            assert f["1.1/x"][()].tolist() == [1.0, 2.0, 3.0]
    finally:
        writer.kill()
        writer.wait()
    files = OpenFiles()
    handle = files.acquire(path, resume=True)  # flags cleared, no lock left behind
    assert handle.h5["1.1/x"].shape == (3,)
    files.release(handle)
    assert not lock_file_of(path).exists()  # removed with the lock
    with h5py.File(path, "r") as f:  # closed: h5py's defaults
        assert f["1.1/x"].shape == (3,)


def test_shared_file_says_being_written_while_a_scan_it_links_is(tmp_path):
    """silx opens a shared file plainly first, and HDF5 refuses to follow its link into a
    scan file written in SWMR mode: the shared file carries the SWMR-writing flags meanwhile,
    so the plain open fails and silx opens it with swmr=True, which reaches the scan."""
    import silx.io

    from writer.hdf5.shared_file import sync_master_flags

    from writer.hdf5.superblock import status_flags

    master = tmp_path / "sample.h5"
    scan_file = scan_file_in(master, "1.1")
    scan_file.parent.mkdir()
    writer = _started(OUR_WRITER, scan_file)
    try:
        link_entry(master, "1.1", scan_file)
        assert status_flags(master) == 0x05
        with pytest.raises(OSError, match="already open for write"):
            h5py.File(master, "r")
        with silx.io.open(str(master)) as f:
            assert f["1.1/x"][()].tolist() == [1.0, 2.0, 3.0]
    finally:
        writer.kill()
        writer.wait()
    clear_write_flags(scan_file)  # as the writer's close does
    sync_master_flags(master)
    assert status_flags(master) == 0
    with h5py.File(master, "r") as f:  # h5py's defaults once no scan is written
        assert f["1.1/x"][()].tolist() == [1.0, 2.0, 3.0]
