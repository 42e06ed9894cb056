"""`python -m blissdata.redis_server` and EmbeddedRedis never outlive their parent: real
processes, real signals, then a restart on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import redis

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG and /proc are Linux's")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_server(port: int) -> tuple[subprocess.Popen, int]:
    """A real `python -m blissdata.redis_server --port PORT` once it printed its URL, and the
    pid of its server child."""
    proc = subprocess.Popen([sys.executable, "-m", "blissdata.redis_server", "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    assert line.startswith(f"REDIS_URL=redis://127.0.0.1:{port}"), (line, proc.stderr.read())
    (child,) = children(proc.pid)
    return proc, child


def pings(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_connect_timeout=1) as client:
            return client.ping()
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_stops_the_server_child_then_the_port_is_free_again(signum):
    port = free_port()
    proc, child = start_server(port)
    assert pings(port)
    proc.send_signal(signum)
    assert proc.wait(10) == 0, proc.stderr.read()
    assert wait_gone(child), f"valkey-server {child} outlived {signum.name} to its parent"
    assert not pings(port)
    again, child2 = start_server(port)  # the same port: nothing left on it
    try:
        assert pings(port)
    finally:
        again.terminate()
        again.wait(10)
    assert wait_gone(child2)


def test_kill_9_of_the_parent_ends_the_server_child():
    port = free_port()
    proc, child = start_server(port)
    proc.kill()
    proc.wait(10)
    assert wait_gone(child), "valkey-server outlived its parent killed -9"
    again, child2 = start_server(port)
    again.terminate()
    again.wait(10)
    assert wait_gone(child2)


def test_embedded_redis_in_a_killed_program_ends_with_it(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from blissdata.redis_server import EmbeddedRedis
        server = EmbeddedRedis().start()
        print(server.process.pid, server.port, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child, port = map(int, proc.stdout.readline().split())
    assert pings(port)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert wait_gone(child), "EmbeddedRedis's server outlived its program killed -9"
    assert not pings(port)


def test_busy_port_is_said_on_the_first_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "blissdata.redis_server", "--port",
                               str(port)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stdout == ""
    first = done.stderr.splitlines()[0]
    assert f"port {port} is busy" in first, done.stderr
