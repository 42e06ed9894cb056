"""Several real writer processes on one session (writer/state/pool.py, writer/state/lease.py): every scan
written once, a writer killed -9 or paused (SIGSTOP) past its lease replaced by another, and
a paused writer that comes back (SIGCONT) fenced off its file."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import redis

from blissdata import EndReason, keys
from blissdata.exceptions import LeaseLostError
from writer.state import status as writer_status
from writer.commands.cli import main as cli_main
from writer.state.pool import read_writers
from writer.commands.validate import validate_file
from writer_helpers import durable_points, wait_status

LEASE_TTL_S = 1.5


@pytest.fixture
def writers(store, data_root, tmp_path):
    """Factory: n `blisswriter run` processes on session "s"; stopped at the end."""
    procs = []

    def start(n, lease_ttl_s=LEASE_TTL_S):
        config = tmp_path / f"writer-{lease_ttl_s}.toml"
        config.write_text(f"lease_ttl_s = {lease_ttl_s}\nmax_lag_s = 0.2\n"
                          f"inactivity_timeout_s = 60\ncompression_threads = 0\n")
        for _ in range(n):
            log = tmp_path / f"writer-{len(procs)}.log"
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
                 "--redis", store.url, "--data-root", str(data_root), "--session", "s",
                 "--log-level", "DEBUG"],
                stdout=open(log, "ab"), stderr=subprocess.STDOUT))
        pids = {p.pid for p in procs}
        wait_for(lambda: pids <= {w["pid"] for w in read_writers(store.redis) if w["alive"]},
                 20, "every writer registered", procs, tmp_path)
        return procs

    yield start
    stop_writers(procs)


def logs(tmp_path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                     for p in sorted(tmp_path.glob("writer-*.log")))


def stop_writers(procs):
    """SIGTERM to each writer still running (SIGCONT first: one may be stopped), then wait,
    killing those that do not stop within 20 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(predicate, timeout, what, procs=(), tmp_path=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s\n"
                                 f"{logs(tmp_path) if tmp_path else ''}")
        time.sleep(0.05)


def holder_pid(store, scan_key) -> int | None:
    """Pid of the writer holding the scan's lease (token "host:pid/..."), None if free."""
    token = store.redis.get(keys.lease_key(scan_key))
    return int(token.decode().split("/")[0].split(":")[1].split("#")[0]) if token else None


def new_scan(store, path, number, frames=True):
    scan = store.create_scan({"session": "s", "name": "ascan", "number": number,
                              "path": str(path)},
                             info={"title": f"ascan {number}", "type": "ascan",
                                   "scan_nb": number})
    streams = [scan.create_stream("diode", "float64")]
    if frames:
        streams.append(scan.create_stream("cam", "uint16", (16, 16)))
    scan.prepare()
    scan.start()
    return scan, streams


def expected(number, npoints):
    diode = number * 1000.0 + np.arange(npoints)
    cam = ((np.arange(npoints * 256) + number) % 65521).astype(np.uint16)
    return diode, cam.reshape(npoints, 16, 16)


def send(scan, streams, start, stop):
    diode, cam = expected(scan.number, stop)
    batch = {streams[0]: diode[start:stop]}
    if len(streams) > 1:
        batch[streams[1]] = cam[start:stop]
    scan.send_many(batch)


def wait_released(store, scans):
    """Until no writer holds these scans: their files are closed (released after)."""
    wait_for(lambda: all(holder_pid(store, scan.key) is None for scan, *_ in scans), 20,
             "leases released")


def check_entry(path, number, npoints, frames=True):
    diode, cam = expected(number, npoints)
    with h5py.File(path, "r", locking=False) as f:
        entry = f[f"{number}.1"]
        assert np.array_equal(entry["measurement/diode"][()], diode)
        if frames:
            assert np.array_equal(entry["measurement/cam"][()], cam)
        assert entry["end_reason"][()].decode() == "SUCCESS"


def test_three_writers_share_a_dozen_scans(store, writers, data_root, tmp_path, capsys):
    procs = writers(3, lease_ttl_s=5)  # no takeover wanted here, even on a loaded machine
    # scans 1-4 go to one file, all running at once; 5-12 to a file each
    paths = {n: data_root / ("shared.h5" if n <= 4 else f"scan{n}.h5") for n in range(1, 13)}
    running = [new_scan(store, paths[n], n) for n in range(1, 13)]
    npoints = 60
    for start in range(0, npoints, 10):
        for scan, streams in running:
            send(scan, streams, start, start + 10)
        time.sleep(0.05)
    wait_for(lambda: all(holder_pid(store, scan.key) for scan, _ in running), 20,
             "every scan taken", procs, tmp_path)
    # a writer publishes a scan's status once it has opened the scan's file, after its lease
    wait_for(lambda: sum(1 for st in writer_status.read_recent(store.redis) if st.held_by)
             == len(running), 20, "every scan's status published", procs, tmp_path)
    assert cli_main(["status", "--redis", store.url]) == 0
    shown = capsys.readouterr().out
    assert shown.count(" alive ") == 3, shown
    assert shown.count("held by writer") == 12, shown  # every scan open: each has a holder
    for scan, _ in running:
        scan.stop()
        scan.close(EndReason.SUCCESS)
    writer_of = {}
    for scan, _ in running:
        st = wait_status(store, scan.key, timeout=60)
        assert st.state == "done", (st.error, logs(tmp_path))
        assert st.warnings == [], st.warnings  # written by one writer, from the start
        assert all(points == npoints for points in st.points.values()), st.points
        writer_of[scan.number] = st.writer
    wait_released(store, running)  # files closed
    for scan, _ in running:
        check_entry(paths[scan.number], scan.number, npoints)
    # one file, one writer; the work is shared
    assert len({writer_of[n] for n in range(1, 5)}) == 1, writer_of
    assert len(set(writer_of.values())) >= 2, writer_of
    assert set(writer_of.values()) <= {w["id"] for w in read_writers(store.redis)}
    with h5py.File(paths[1], "r", locking=False) as f:
        assert sorted(f) == ["1.1", "2.1", "3.1", "4.1"]
    for path in set(paths.values()):
        assert validate_file(path).ok, validate_file(path).errors
    for proc in procs:
        assert proc.poll() is None, logs(tmp_path)


def test_kill_9_writer_holding_running_scans(store, writers, data_root, tmp_path):
    """Two scans share a file: the writer holding them is killed -9 mid-scan; another takes
    both over and finishes them, every point once."""
    procs = writers(2)
    path = data_root / "killed.h5"
    running = [new_scan(store, path, 1), new_scan(store, path, 2)]
    npoints = 400
    for start in range(0, 200, 20):
        for scan, streams in running:
            send(scan, streams, start, start + 20)
    for scan, _ in running:
        wait_for(lambda: durable_points(store, scan.key, "cam") >= 200, 20,
                 "points durable before the kill", procs, tmp_path)
    victim_pid = holder_pid(store, running[0][0].key)
    assert victim_pid == holder_pid(store, running[1][0].key)  # one file, one writer
    victim = next(p for p in procs if p.pid == victim_pid)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    for start in range(200, npoints, 20):  # the producers go on meanwhile
        for scan, streams in running:
            send(scan, streams, start, start + 20)
        time.sleep(0.02)
    for scan, _ in running:
        scan.stop()
        scan.close(EndReason.SUCCESS)
    survivor = next(p for p in procs if p.pid != victim_pid)
    for scan, _ in running:
        st = wait_status(store, scan.key, timeout=60)
        assert st.state == "done", (st.error, logs(tmp_path))
        assert st.writer.split(":")[1].split("#")[0] == str(survivor.pid)
        assert "resumed after a writer restart" in st.warnings
    wait_released(store, running)  # file closed
    for scan, _ in running:
        check_entry(path, scan.number, npoints)
    assert validate_file(path).ok
    assert survivor.poll() is None


def test_paused_writer_replaced_then_fenced(store, writers, data_root, tmp_path):
    """A writer paused (SIGSTOP) past its lease: another takes the scan over (and waits for
    the file, which the paused one still has locked); resumed (SIGCONT), the paused one
    notices it lost the lease, writes nothing more and lets go; the file ends right."""
    procs = writers(2)
    path = data_root / "paused.h5"
    scan, streams = new_scan(store, path, 1)
    npoints = 300
    send(scan, streams, 0, 100)
    wait_for(lambda: durable_points(store, scan.key, "cam") >= 100, 20, "points durable",
             procs, tmp_path)
    paused_pid = holder_pid(store, scan.key)
    paused = next(p for p in procs if p.pid == paused_pid)
    other = next(p for p in procs if p.pid != paused_pid)
    paused.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: holder_pid(store, scan.key) == other.pid, 20,
                 "lease taken over by the other writer", procs, tmp_path)
        send(scan, streams, 100, npoints)
        scan.stop()
        scan.close(EndReason.SUCCESS)
        # the new holder waits for the file the paused writer still has locked
        wait_for(lambda: any("waiting for the writer" in w for w in
                             writer_status.read(store.redis, scan.key).warnings), 20,
                 "new holder waits for the file", procs, tmp_path)
        assert writer_status.read(store.redis, scan.key).state == "writing"
    finally:
        paused.send_signal(signal.SIGCONT)
    st = wait_status(store, scan.key, timeout=60)
    assert st.state == "done", (st.error, logs(tmp_path))
    assert st.writer.split(":")[1].split("#")[0] == str(other.pid)
    wait_released(store, [(scan,)])
    check_entry(path, 1, npoints)
    assert validate_file(path).ok
    # the resumed writer lives on and does not touch the file again
    before = os.stat(path)
    time.sleep(3 * LEASE_TTL_S)
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert paused.poll() is None
    assert "lost" in (tmp_path / f"writer-{procs.index(paused)}.log").read_text()
    assert writer_status.read(store.redis, scan.key).state == "done"
    check_entry(path, 1, npoints)


# ---- the lease primitives on a real server (no mock) -----------------------------------------

def test_lease_taken_once_renewed_and_fenced(store, new_scan):
    from writer.state.lease import FileLease

    mine = FileLease(store.redis, "/data/a.h5", "w1/aaaa", ttl_s=0.5)
    other = FileLease(store.redis, "/data/a.h5", "w2/bbbb", ttl_s=0.5)
    assert mine.take() and not other.take()
    scan = new_scan()
    lease = mine.take_scan(scan.key)
    assert lease is not None and other.take_scan(scan.key) is None
    assert mine.renew() and lease.holds()
    time.sleep(0.6)  # expired: another writer takes both
    assert other.take() and other.take_scan(scan.key) is not None
    assert not mine.renew() and mine.lost and not lease.holds()
    with pytest.raises(LeaseLostError, match="lost its lease on /data/a.h5"):
        lease.check()
    mine.release_scan(scan.key)  # a lost lease is never released: it is the other's now
    mine.release()
    assert store.redis.get(keys.lease_key(scan.key)) == b"w2/bbbb"


def test_watermark_and_status_refused_without_the_lease(store, new_scan):
    scan = new_scan()
    stream = scan.create_stream("x", "float64")
    scan.prepare()
    stream.send(np.arange(10.0))
    store.redis.set(keys.lease_key(scan.key), "w2/bbbb")
    fence = (keys.lease_key(scan.key), "w1/aaaa")
    with pytest.raises(LeaseLostError, match="watermark of 'x' not published"):
        stream.mark_file_backed("/data/a.h5", "/1.1/x", 10, fence=fence)
    assert stream.file_backing is None
    assert stream.mark_file_backed("/data/a.h5", "/1.1/x", 10,
                                   fence=(keys.lease_key(scan.key), "w2/bbbb")) == 10
    status = writer_status.ScanStatus(scan.key, state="done", lease="w1/aaaa")
    with pytest.raises(LeaseLostError, match="status not published"):
        writer_status.publish(store.redis, status)
    assert writer_status.read(store.redis, scan.key) is None


def test_writer_cut_off_from_redis_stops_trusting_its_lease(tmp_path):
    """Redis unreachable: the lease counts until its local deadline, then not (another
    writer may have it by then)."""
    from blissdata.redis_server import EmbeddedRedis
    from writer.state.lease import FileLease

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5,
                                      socket_connect_timeout=0.5)
        lease = FileLease(client, str(tmp_path / "a.h5"), "w1/aaaa", ttl_s=0.5)
        assert lease.take() and lease.holds()
        server.process.send_signal(signal.SIGSTOP)  # a network cut, as the client sees it
        try:
            assert lease.holds()  # within the deadline: no round trip
            time.sleep(0.5)
            assert not lease.holds()
        finally:
            server.process.send_signal(signal.SIGCONT)
        client.close()


def test_bad_lease_settings_are_refused(tmp_path):
    from writer.service.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="lease_ttl_s"):
        load_config(None, lease_ttl_s=0)
    with pytest.raises(ConfigError, match="redis_url"):
        load_config(None, redis_url="cluster://127.0.0.1:1")
    with pytest.raises(ConnectionError, match=r"redis\+cluster://127.0.0.1:1"):
        from blissdata import DataStore

        DataStore("redis+cluster://127.0.0.1:1")


def test_unreadable_scan_in_the_unfinished_list(store, data_root):
    from writer.state.pool import UNFINISHED
    from writer_helpers import seed_scan, start_writer

    store.redis.hset("blissdata:scan:{bad}", "identity", "not JSON")
    store.redis.zadd(UNFINISHED, {"blissdata:scan:{bad}": 1.0})
    service, thread = start_writer(store.url, data_root)
    try:
        scan, data = seed_scan(store, data_root / "ok.h5")
        assert wait_status(store, scan.key).state == "done"
        assert thread.is_alive()
    finally:
        service.stop()
        thread.join(30)


class CuttableLink:
    """A TCP relay to Redis for one writer; ``cut()`` drops every connection and refuses new
    ones, as a network cut between that writer and Redis would (Redis stays up)."""

    def __init__(self, redis_url):
        import socket
        import threading

        host, port = redis_url.split("//", 1)[1].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets = []
        self.cut_done = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while not self.cut_done:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def cut(self):
        import socket

        self.cut_done = True
        self.listener.close()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass


def test_writer_cut_off_from_redis_is_replaced(store, data_root, tmp_path):
    """A writer loses its network to Redis mid-scan (the process lives on): another writer
    takes the scan over; the cut-off one lets go of the file; every point once."""
    config = tmp_path / "writer.toml"
    config.write_text(f"lease_ttl_s = {LEASE_TTL_S}\nmax_lag_s = 0.2\n")
    link = CuttableLink(store.url)

    def start(url, n):
        return subprocess.Popen(
            [sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config), "--redis", url,
             "--data-root", str(data_root), "--session", "s", "--log-level", "DEBUG"],
            stdout=open(tmp_path / f"writer-{n}.log", "ab"), stderr=subprocess.STDOUT)

    cut_off = start(link.url, 0)
    procs = [cut_off]
    try:
        path = data_root / "cut.h5"
        scan, streams = new_scan(store, path, 1)
        send(scan, streams, 0, 100)
        wait_for(lambda: durable_points(store, scan.key, "cam") >= 100, 20, "points durable",
                 procs, tmp_path)
        assert holder_pid(store, scan.key) == cut_off.pid
        other = start(store.url, 1)
        procs.append(other)
        wait_for(lambda: other.pid in {w["pid"] for w in read_writers(store.redis)}, 20,
                 "second writer registered", procs, tmp_path)
        link.cut()
        wait_for(lambda: holder_pid(store, scan.key) == other.pid, 30,
                 "lease taken over by the connected writer", procs, tmp_path)
        send(scan, streams, 100, 300)
        scan.stop()
        scan.close(EndReason.SUCCESS)
        st = wait_status(store, scan.key, timeout=60)
        assert st.state == "done", (st.error, logs(tmp_path))
        assert st.writer.split(":")[1].split("#")[0] == str(other.pid)
        wait_released(store, [(scan,)])
        check_entry(path, 1, 300)
        assert validate_file(path).ok
        assert cut_off.poll() is None  # alive, retrying its Redis
    finally:
        stop_writers(procs)
