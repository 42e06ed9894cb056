"""Start order does not matter: `blisswriter run` and `blisswriter status --watch` started
before Redis wait for it, with the backoff and log lines of a Redis lost later, and serve
once it comes; `--no-wait-for-redis` exits instead, for scripts. Real processes and a real
server started second on the port they were given."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import h5py
import numpy as np

from blissdata import DataStore
from blissdata.redis_server import EmbeddedRedis
from writer_helpers import SEED_STREAMS, Lines, seed_scan, stop_process, wait_status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def writer_command(url, data_root, *options):
    return [sys.executable, "-m", "writer.commands.cli", "run", "--redis", url, "--data-root",
            str(data_root), *options]


def test_writer_started_before_redis_waits_then_writes_the_scan(data_root):
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    writer = subprocess.Popen(writer_command(url, data_root), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    server = None
    try:
        err = Lines(writer.stderr)
        err.wait_for(lambda line: f"Redis at {url} unreachable while connecting" in line)
        time.sleep(1.0)  # a few tries with backoff, still waiting
        assert writer.poll() is None
        server = EmbeddedRedis(port=port).start()
        err.wait_for(lambda line: f"Redis at {url}: reconnected after" in line)
        err.wait_for(lambda line: "following" in line)
        store = DataStore(url)
        scan, data = seed_scan(store, data_root / "late.h5", number=3, npoints=11)
        assert wait_status(store, scan.key, timeout=60).state == "done"
        with h5py.File(data_root / "late.h5", "r", locking=False) as f:
            assert np.array_equal(f["3.1/instrument/diode/data"][()], data[SEED_STREAMS[0]])
        store.close()
        writer.terminate()
        assert writer.wait(30) == 0
        assert not [line for line in err.lines if "Traceback" in line], err.lines
    finally:
        stop_process(writer)
        if server is not None:
            server.stop()


def test_writer_no_wait_for_redis_exits_at_once(data_root):
    url = f"redis://127.0.0.1:{free_port()}"
    done = subprocess.run(writer_command(url, data_root, "--no-wait-for-redis"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot reach Redis at {url}" in done.stderr and "Traceback" not in done.stderr


def test_status_watch_started_before_redis_waits_for_it():
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    watcher = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "status", "--watch",
                                "--json", "--interval", "0.2", "--redis", url],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        out, err = Lines(watcher.stdout), Lines(watcher.stderr)
        err.wait_for(lambda line: f"cannot reach Redis at {url}" in line
                     and "waiting for it" in line)
        time.sleep(0.5)
        assert watcher.poll() is None
        server = EmbeddedRedis(port=port).start()
        err.wait_for(lambda line: f"Redis at {url} is back" in line)
        out.wait_for(lambda line: line.strip() == "[]")
        watcher.terminate()
        watcher.wait(10)
        assert not [line for line in err.lines if "Traceback" in line], err.lines
    finally:
        stop_process(watcher)
        if server is not None:
            server.stop()


def test_status_watch_no_wait_for_redis_exits_at_once():
    url = f"redis://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "writer.commands.cli", "status", "--watch",
                           "--no-wait-for-redis", "--redis", url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"cannot reach Redis at {url}" in done.stderr and "waiting" not in done.stderr
