"""What the commands print: `blisswriter status` (--json, --watch through a Redis restart,
--interval checks) and the demo, on a terminal or piped into a log."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from blissdata.redis_server import EmbeddedRedis
from writer_helpers import Lines, seed_scan, stop_process, wait_status

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def status(*args, redis_url):
    return subprocess.run([str(BIN / "blisswriter"), "status", "--redis", redis_url, *args],
                          capture_output=True, text=True, timeout=60)


def test_status_json_and_piped_table(store, redis_url, data_root):
    writer = subprocess.Popen([str(BIN / "blisswriter"), "run", "--redis", redis_url,
                               "--data-root", str(data_root)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        scan, _ = seed_scan(store, data_root / "s.h5", number=7, npoints=12, session="jsn")
        assert wait_status(store, scan.key, timeout=60).state == "done"
    finally:
        stop_process(writer)
    done = status("--json", redis_url=redis_url)
    assert done.returncode == 0, done.stderr
    (got,) = [st for st in json.loads(done.stdout) if st["scan_key"] == scan.key]
    assert got["state"] == "done" and got["number"] == 7 and got["session"] == "jsn"
    assert got["points"] == {name: 12 for name in got["points"]} and got["file"]
    table = status(redis_url=redis_url)
    assert table.returncode == 0 and "jsn" in table.stdout and "12/12" in table.stdout
    assert "\x1b" not in table.stdout and "\r" not in table.stdout


@pytest.mark.parametrize("value, why", [("-1", "at least 0.1 s, got -1"),
                                        ("0", "at least 0.1 s, got 0"),
                                        ("nan", "at least 0.1 s, got nan"),
                                        ("soon", "'soon' is not a number of seconds")])
def test_status_interval_refused_clearly(value, why):
    done = subprocess.run([str(BIN / "blisswriter"), "status", "--watch", "--interval", value],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr


def test_status_watch_survives_a_redis_restart(tmp_path):
    first = EmbeddedRedis().start()
    url = first.url
    port = int(url.rsplit(":", 1)[1])
    watcher, second = None, None
    try:
        watcher = subprocess.Popen([str(BIN / "blisswriter"), "status", "--watch", "--json",
                                    "--interval", "0.2", "--redis", url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = Lines(watcher.stdout), Lines(watcher.stderr)
        out.wait_for(lambda line: line.strip() == "[]")
        first.stop()
        err.wait_for(lambda line: "lost Redis" in line and url in line)
        assert watcher.poll() is None  # still watching
        second = EmbeddedRedis(port=port).start()
        client = redis.Redis.from_url(url)
        client.zadd("blissdata:writer:scans", {"blissdata:scan:{x}": time.time()})
        client.hset("blissdata:scan:{x}:writer", "status",
                    json.dumps({"scan_key": "blissdata:scan:{x}", "state": "writing"}))
        err.wait_for(lambda line: "is back" in line)
        line = out.wait_for(lambda line: "blissdata:scan:{x}" in line)
        assert json.loads(line)[0]["state"] == "writing"
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        assert not [line for line in err.lines if "Traceback" in line]
    finally:
        if watcher is not None and watcher.poll() is None:
            watcher.kill()
        first.stop()
        if second is not None:
            second.stop()


def test_demo_piped_writes_plain_lines(tmp_path):
    done = subprocess.run([sys.executable, "-m", "writer.commands.demo", "--fixtures", "ascan", "mca",
                           "--points", "4", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path,
                          env={**os.environ, "TERM": "xterm-256color"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\r" not in done.stdout and "\x1b" not in done.stdout
    lines = done.stdout.splitlines()
    assert any(line.split() == ["publishing", "ascan", "4/4", "points"] for line in lines)
    assert any(line.split() == ["publishing", "mca", "4/4", "points"] for line in lines)


def test_simulate_and_replay_progress_plain_when_piped_redrawn_on_a_terminal(redis_url,
                                                                             tmp_path):
    """blissdata-simulate and blissdata-replay: one final progress line in a pipe (no carriage
    returns in logs), redrawn in place on a terminal (a real pty)."""
    import pty

    path = tmp_path / "s.h5"
    simulate = [sys.executable, "-m", "blissdata.simulate", "ascan", "--points", "6",
                "--redis", redis_url, "--session", "progress", "--path", str(path)]
    piped = subprocess.run(simulate, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stdout
    assert "ascan: 6/6 points published" in piped.stdout.splitlines()

    leader, follower = pty.openpty()
    on_terminal = subprocess.run(simulate, stdout=follower, stderr=subprocess.PIPE, timeout=120)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the pty is closed once the child is gone and everything was read
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert on_terminal.returncode == 0, on_terminal.stderr
    assert b"\rascan: 6/6 points published" in shown

    archive = tmp_path / "archive.h5"
    import numpy as np
    import h5py
    with h5py.File(archive, "w") as f:  # the smallest archived scan replay accepts
        entry = f.create_group("1.1")
        entry.attrs["NX_class"] = "NXentry"
        entry["title"] = "ct 0.1"
        entry.create_group("measurement").attrs["NX_class"] = "NXcollection"
        entry["measurement/diode"] = np.arange(4.0)
    replayed = subprocess.run([sys.executable, "-m", "blissdata.replay", str(archive),
                               "--redis", redis_url, "--session", "progress",
                               "--path", str(tmp_path / "r.h5")],
                              capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "\r" not in replayed.stdout
    assert "replaying: 4/4 points" in replayed.stdout.splitlines()
