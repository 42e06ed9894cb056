"""The commands as a user runs them, with real processes (issue 23): validate and rewrite only
read (also a read-only file, also a scan still being written), `status --wait` for scripts,
`status` at 80 columns, producers interrupted end their scan, `blisswriter end` for a scan
whose producer died, the simulator's and replay's traps."""

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from writer.state import status as writer_status
from writer_helpers import stop_process, wait_status

BIN = Path(sys.executable).parent


def run(*args, timeout=120, **kwargs):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def start_writer(redis_url, data_root, session):
    return subprocess.Popen([str(BIN / "blisswriter"), "run", "--redis", redis_url, "--session",
                             session, "--data-root", str(data_root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def simulate(redis_url, *args):
    return subprocess.Popen([str(BIN / "blissdata-simulate"), *args, "--redis", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scan_key_of(store, session, number, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = store.search_scans(session=session, number=number)
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no scan {session}:{number}")


def wait_points(store, key, points, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = writer_status.read(store.redis, key)
        if st and st.points and min(st.points.values()) >= points:
            return st
        time.sleep(0.05)
    raise AssertionError(f"scan {key}: not {points} points durable within {timeout} s")


def no_traceback(*outputs):
    for out in outputs:
        assert "Traceback" not in out and "h5clear" not in out, out


def test_validate_reads_only_a_read_only_file(store, redis_url, data_root):
    """validate changes no modification time and validates a file nobody may write
    (chattr +i: even root cannot open it for writing)."""
    writer = start_writer(redis_url, data_root, "ro")
    try:
        sim = run("blissdata-simulate", "ascan", "--points", "8", "--session", "ro",
                  "--number", "3", "--path", str(data_root / "ro.h5"), "--redis", redis_url)
        assert sim.returncode == 0, sim.stderr
        waited = run("blisswriter", "status", "--wait", "3", "--session", "ro", "--timeout",
                     "60", "--redis", redis_url)
        assert waited.returncode == 0, waited.stderr
        assert " done: " in waited.stdout and str(data_root / "ro.h5") in waited.stdout
    finally:
        stop_process(writer)
    files = [data_root / "ro.h5", data_root / "ro" / "ro_3.1.h5"]
    for path in files:
        os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    immutable = subprocess.run(["chattr", "+i", *map(str, files)], capture_output=True)
    try:
        if immutable.returncode != 0:
            pytest.skip(f"chattr +i refused here: {immutable.stderr.decode().strip()}")
        with pytest.raises(PermissionError):
            open(files[0], "r+b")  # the user really may not write it
        done = run("blisswriter", "validate", *map(str, files))
    finally:
        subprocess.run(["chattr", "-i", *map(str, files)], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": OK, 0 errors") == 2
    for path in files:
        assert path.stat().st_mtime_ns == 1_600_000_000_000_000_000, path


def test_scan_being_written_validate_rewrite_then_end_of_a_dead_producer(store, redis_url,
                                                                          data_root, tmp_path):
    """While the writer writes a scan: validate and rewrite say so (exit 3), for the shared
    file and the scan's own file, no traceback, no h5clear advice, no false "no NXentry".
    The producer is then killed -9: `blisswriter end` closes the scan and the writer
    finishes the file; `status --wait` returns at once for it."""
    writer = start_writer(redis_url, data_root, "live")
    producer = simulate(redis_url, "ascan", "--points", "1000", "--rate", "20", "--session",
                        "live", "--number", "4", "--path", str(data_root / "live.h5"))
    try:
        key = scan_key_of(store, "live", 4)
        wait_points(store, key, 3)
        own = data_root / "live" / "live_4.1.h5"
        for path in (data_root / "live.h5", own):
            done = run("blisswriter", "validate", str(path))
            assert done.returncode == 3, done.stdout + done.stderr
            assert "scan 4.1" in done.stderr and "still being written (state writing)" in \
                done.stderr and "validate it once done" in done.stderr
            assert "no NXentry" not in done.stdout
            no_traceback(done.stdout, done.stderr)
        copy = run("blisswriter", "rewrite", str(data_root / "live.h5"), str(tmp_path / "c.h5"))
        assert copy.returncode == 3 and "still being written" in copy.stderr, copy.stderr
        assert not (tmp_path / "c.h5").exists()
        no_traceback(copy.stdout, copy.stderr)
        early = run("blisswriter", "status", "--wait", key, "--timeout", "0.5",
                    "--redis", redis_url)
        assert early.returncode == 3 and "not finished within 0.5 s (state writing)" in \
            early.stderr, early.stderr

        producer.kill()  # the producer dies: nothing would ever close the scan
        producer.wait(10)
        assert store.load_scan(key).state.name == "STARTED"
        ended = run("blisswriter", "end", key, "--message", "producer killed",
                    "--redis", redis_url)
        assert ended.returncode == 0, ended.stderr
        assert "ended FAILURE" in ended.stdout
        waited = run("blisswriter", "status", "--wait", key, "--timeout", "60",
                     "--redis", redis_url)
        assert waited.returncode == 0, waited.stderr
        again = run("blisswriter", "end", key, "--redis", redis_url)
        assert again.returncode == 1 and "already CLOSED" in again.stderr
        unknown = run("blisswriter", "end", "77", "--session", "live", "--redis", redis_url)
        assert unknown.returncode == 2 and "no scan numbered 77" in unknown.stderr
    finally:
        if producer.poll() is None:
            producer.kill()
        stop_process(writer)
    scan = store.load_scan(key)
    assert scan.info["end_reason"] == "FAILURE" and scan.info["end_message"] == "producer killed"
    with h5py.File(data_root / "live.h5", "r") as f:  # a plain open: the file is closed
        assert f["4.1/end_reason"][()] == b"FAILURE"
        written = len(f["4.1/measurement/diode"])
    assert written == len(scan.streams["diode:diode"])
    done = run("blisswriter", "validate", str(data_root / "live.h5"))
    assert done.returncode == 0, done.stdout + done.stderr
    copy = run("blisswriter", "rewrite", str(data_root / "live.h5"), str(tmp_path / "c.h5"),
               "--compression", "bslz4")
    assert copy.returncode == 0, copy.stderr


def test_status_wait_exit_codes(store, redis_url, data_root, new_scan):
    """failed: 1; unknown scan at the timeout: 3; number in two sessions: 2; no Redis: 5."""
    from writer_helpers import seed_scan

    writer = start_writer(redis_url, data_root, "wait")
    try:
        # outside the data root: the writer refuses the path, the scan fails
        failed, _ = seed_scan(store, "/elsewhere/f.h5", number=5, npoints=3, session="wait")
        done = run("blisswriter", "status", "--wait", "5", "--session", "wait", "--timeout",
                   "60", "--redis", redis_url)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"scan 5 of session 'wait' {failed.key}: failed" in done.stdout
    finally:
        stop_process(writer)
    never = run("blisswriter", "status", "--wait", "6", "--session", "wait", "--timeout", "0.3",
                "--redis", redis_url)
    assert never.returncode == 3 and "no scan 6 of session 'wait' in Redis within 0.3 s" in \
        never.stderr
    new_scan(number=8, session="one")
    new_scan(number=8, session="two")
    both = run("blisswriter", "status", "--wait", "8", "--timeout", "5", "--redis", redis_url)
    assert both.returncode == 2 and "sessions ['one', 'two']: give --session" in both.stderr
    lost = run("blisswriter", "status", "--wait", "1", "--redis", "redis://127.0.0.1:1")
    assert lost.returncode == 5 and "Traceback" not in lost.stderr
    alone = run("blisswriter", "status", "--timeout", "3", "--redis", redis_url)
    assert alone.returncode == 2 and "--timeout goes with --wait" in alone.stderr


def read_pty(args, columns=80, env=None, timeout=60):
    """What `args` draws on a real terminal `columns` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm-256color",
           **(env or {})}
    proc = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # closed: the child is gone and everything was read
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(10) == 0, shown
    return re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", shown.decode()).replace("\r", "")


def test_status_fits_80_columns_on_a_terminal(redis_client, redis_url):
    """Every line within 80 columns; headers, names and states whole; an unfinished scan no
    live writer holds says "no writer"; --state idle; what an empty filter says."""
    for i, (name, state) in enumerate([("timescan_lima", "done"), ("a2scan", "failed"),
                                       ("ascan", "writing"), ("mesh", "idle")]):
        writer_status.publish(redis_client, writer_status.ScanStatus(
            f"blissdata:scan:{{narrow{i}}}", session="narrow", number=i + 1, name=name,
            state=state, expected_points=100, points={"a": 39}, bytes_written=123_456_789,
            file_bytes=2_000_000, stored_bytes=1_990_000))
    shown = read_pty([str(BIN / "blisswriter"), "status", "--redis", redis_url])
    lines = shown.splitlines()
    assert lines and max(len(line) for line in lines) <= 80, shown
    header = next(line for line in lines if line.startswith("session"))
    assert header.split()[:5] == ["session", "scan", "name", "state", "progress"], header
    assert "age" in header.split()
    rows = {line.split()[2]: line for line in lines if line.startswith("narrow ")}
    assert set(rows) == {"timescan_lima", "a2scan", "ascan", "mesh"}, shown
    assert " done " in rows["timescan_lima"] and " failed " in rows["a2scan"]
    assert " no writer " in rows["ascan"] and " no writer " in rows["mesh"]  # stale statuses
    assert "39/100" in rows["ascan"]
    wide = read_pty([str(BIN / "blisswriter"), "status", "--redis", redis_url], columns=160)
    assert "MB/s" in wide and "file MB" in wide  # the byte counts where there is room

    idle = run("blisswriter", "status", "--state", "idle", "--all", "--json", "--redis",
               redis_url)
    assert idle.returncode == 0 and [st["name"] for st in json.loads(idle.stdout)] == ["mesh"]
    none = run("blisswriter", "status", "--state", "skipped", "--redis", redis_url)
    assert none.returncode == 0 and "no skipped scan in the last 24 h" in none.stdout
    other = run("blisswriter", "status", "--session", "nobody", "--redis", redis_url)
    assert "no scan of session 'nobody' in the last 24 h" in other.stdout


def test_interrupted_producers_end_their_scan(store, redis_url, data_root):
    """SIGINT to blissdata-simulate, SIGTERM to blissdata-replay: each closes its scan with
    USER_ABORT, without a traceback; the writer finishes the files. The simulated
    elapsed_time follows --rate; replay at --speed 1 takes the scan's real time."""
    writer = start_writer(redis_url, data_root, "stop")
    try:
        paced = simulate(redis_url, "ascan", "--points", "6", "--rate", "5", "--session",
                         "stop", "--number", "1", "--path", str(data_root / "paced.h5"))
        assert paced.wait(60) == 0, paced.stderr.read()
        producer = simulate(redis_url, "ascan", "--points", "1000", "--rate", "20",
                            "--session", "stop", "--number", "2", "--path",
                            str(data_root / "cut.h5"))
        key = scan_key_of(store, "stop", 2)
        wait_points(store, key, 2)
        producer.send_signal(signal.SIGINT)
        out, err = producer.communicate(timeout=30)
        assert producer.returncode == 130, err
        assert "stopped by SIGINT: ended with USER_ABORT: scan 2 ascan" in err
        no_traceback(out, err)
        assert wait_status(store, key, timeout=60).state == "done"

        started = time.monotonic()
        replayed = run("blissdata-replay", str(data_root / "paced.h5"), "--entry", "1.1",
                       "--session", "stop", "--number", "3", "--speed", "1", "--path",
                       str(data_root / "again.h5"), "--redis", redis_url)
        took = time.monotonic() - started
        assert replayed.returncode == 0, replayed.stderr
        assert took >= 0.9  # 5 steps of 0.2 s: sleeps, so never shorter

        replayer = subprocess.Popen(
            [str(BIN / "blissdata-replay"), str(data_root / "cut.h5"), "--entry", "2.1",
             "--session", "stop", "--number", "4", "--speed", "0.05", "--path",
             str(data_root / "slow.h5"), "--redis", redis_url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        slow = scan_key_of(store, "stop", 4)
        wait_points(store, slow, 1)
        replayer.send_signal(signal.SIGTERM)
        out, err = replayer.communicate(timeout=30)
        assert replayer.returncode == 143, err
        assert "stopped by SIGTERM: ended with USER_ABORT: scan 4" in err
        no_traceback(out, err)
        assert wait_status(store, slow, timeout=60).state == "done"
    finally:
        stop_process(writer)
    with h5py.File(data_root / "paced.h5", "r") as f:
        np.testing.assert_allclose(f["1.1/measurement/elapsed_time"][:], np.arange(6) * 0.2)
    for path, entry in (("cut.h5", "2.1"), ("slow.h5", "4.1")):
        with h5py.File(data_root / path, "r") as f:
            assert f[f"{entry}/end_reason"][()] == b"USER_ABORT"
    assert store.load_scan(slow).info["end_message"] == "producer interrupted (SIGTERM)"
    assert "done: 6 points in each of" in writer.stderr.read()  # per scan, not x streams


def test_simulator_and_replay_traps(store, redis_url, data_root, tmp_path):
    """A relative --path is refused before publishing; without --path it says where; a
    second external_frames run never overwrites the detector files of the first; replay
    refuses an entry that exists and says which session it uses."""
    relative = run("blissdata-simulate", "ascan", "--session", "trap", "--path",
                   "data/relative.h5", "--redis", redis_url)
    assert relative.returncode == 2 and "is a relative path" in relative.stderr
    assert store.search_scans(session="trap") == []  # nothing published

    default = run("blissdata-simulate", "ascan", "--points", "3", "--session", "trap",
                  "--redis", redis_url, cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    assert f"no --path: the scan's file is {tmp_path}/data/trap/ascan.h5" in default.stderr

    frames = ["blissdata-simulate", "external_frames", "--points", "4", "--session", "trap",
              "--redis", redis_url]
    first = run(*frames, "--number", "5", "--path", str(data_root / "one.h5"))
    assert first.returncode == 0, first.stderr
    detector = data_root / "eiger_0000.h5"
    before = (detector.stat().st_mtime_ns, detector.read_bytes())
    second = run(*frames, "--number", "6", "--path", str(data_root / "two.h5"))
    assert second.returncode == 2 and "eiger_0000.h5 already exist" in second.stderr
    assert (detector.stat().st_mtime_ns, detector.read_bytes()) == before
    assert store.search_scans(session="trap", number=6) == []

    writer = start_writer(redis_url, data_root, "trap")
    try:
        assert wait_status(store, scan_key_of(store, "trap", 5), timeout=60).state == "done"
    finally:
        stop_process(writer)
    existing = run("blissdata-replay", str(data_root / "one.h5"), "--entry", "5.1",
                   "--path", str(data_root / "one.h5"), "--redis", redis_url)
    assert existing.returncode == 2 and "one.h5::/5.1 already exists" in existing.stderr
    assert "no --session: the scan goes to session 'trap'" in existing.stderr
    assert store.search_scans(session="trap", number=5)[1:] == []  # nothing published
    no_traceback(existing.stderr)


def test_rewrite_help_says_what_it_keeps():
    shown = run("blisswriter", "rewrite", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "chunk shape chosen anew" in text and "not copied from INPUT" in text
    assert "bslz4" in text
    bad = run("blisswriter", "rewrite", "a.h5", "b.h5", "--compression", "lz5")
    assert bad.returncode == 2 and "'bslz4'" in bad.stderr
