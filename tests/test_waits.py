"""Blocking waits longer than the socket timeout (redis-py's default: 5 s).

Every wait of the library must last as long as asked (None: for ever) and end with data or
the library's own result (NoScanAvailable, False, {}), never redis.TimeoutError; a Redis
restart during a wait is ridden out; a Redis that stays gone ends the wait with
RedisUnreachableError; Ctrl-C interrupts. The long waits (8-12 s) run concurrently in
threads, so they cost ~12 s together. Marked `waits`: ``-m "not waits"`` skips them, the
plain ``python3 dev.py test`` (CI) runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from blissdata import DataStore, NoScanAvailable, RedisUnreachableError, ScanState
from blissdata.h5api import File
from blissdata.memory_tracker import MemoryTracker
from blissdata.redis_server import EmbeddedRedis

pytestmark = pytest.mark.waits

SOCKET_TIMEOUT = 5.0  # redis-py's default; every wait below is longer


def _scan(store, session, number=1, path="/tmp/never-written.h5"):
    return store.create_scan({"session": session, "name": "ascan", "number": number,
                              "path": path},
                             info={"title": "ascan", "type": "ascan", "scan_nb": number})


class Concurrently:
    """Run the scenarios in threads, keep what each returned or raised."""

    def __init__(self):
        self.results: dict = {}
        self._threads = []

    def run(self, name, fn, *args):
        def body():
            start = time.monotonic()
            try:
                self.results[name] = (fn(*args), time.monotonic() - start)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.results[name] = (exc, time.monotonic() - start)

        thread = threading.Thread(target=body, name=name)
        thread.start()
        self._threads.append(thread)

    def join(self):
        for thread in self._threads:
            thread.join(60)
        return self.results


def test_long_waits_outlast_the_socket_timeout(redis_url, redis_client):
    """A follower, a timeout, a state change, a cursor and h5api iteration, all waiting
    7-10 s on stores with the default 5 s socket timeout."""
    producer = DataStore(redis_url)
    reader = DataStore(redis_url)
    assert reader.redis.get_connection_kwargs().get("socket_timeout", 5) == SOCKET_TIMEOUT

    # the scans whose changes come late exist before the waits start
    slow_state = _scan(producer, "states")
    slow_state_seen = reader.load_scan(slow_state.key)
    quiet = reader.load_scan(_scan(producer, "quiet").key)
    counting = _scan(producer, "counting", path="/tmp/blissdata-waits/counting.h5")
    diode = counting.create_stream("diode", dtype="float64")
    counting.prepare()
    counting.start()
    diode.send(1.0)  # the first point; the next one comes after a 7 s count time
    counting_seen = reader.load_scan(counting.key)
    since = reader.get_next_scan(since="0-0", block=False)[0]  # before any scan of "later"
    h5 = File(reader, "/tmp/blissdata-waits/counting.h5")
    live = h5["/measurement/diode"]

    def follower():
        return reader.get_next_scan(since=since, timeout=12, session="later")

    def no_scan():
        with pytest.raises(NoScanAvailable) as info:
            reader.get_next_scan(timeout=8, session="nobody")
        return str(info.value)

    def state_change():
        changed = slow_state_seen.update(block=True, timeout=10)
        return changed, slow_state_seen.state

    def no_state_change():
        return quiet.update(block=True, timeout=8)

    def cursor_through_count_time():
        cursor = counting_seen.cursor(["diode"])
        got = []
        while "diode" not in cursor.ended:
            for view in cursor.read(timeout=10).values():
                got.extend(view.data.tolist())
        return got

    def h5api_iteration():
        return [float(v) for v in live]

    waits = Concurrently()
    waits.run("follower", follower)
    waits.run("no_scan", no_scan)
    waits.run("state_change", state_change)
    waits.run("no_state_change", no_state_change)
    waits.run("cursor", cursor_through_count_time)
    waits.run("h5api", h5api_iteration)
    time.sleep(7)
    slow_state.prepare()
    diode.send(2.0)
    counting.close()
    time.sleep(1)
    created = _scan(producer, "later", number=7)  # 8 s after the follower started
    results = waits.join()

    for name, (result, _) in results.items():
        assert not isinstance(result, BaseException), f"{name}: {result!r}"
    assert results["follower"][0][1] == created.key
    assert results["follower"][1] >= 8 - 0.5  # it got the scan only once it was created
    message, waited = results["no_scan"]
    assert waited >= 8 and "within 8 s" in message and "'nobody'" in message
    assert results["state_change"][0] == (True, ScanState.PREPARED)
    assert results["no_state_change"][0] is False and results["no_state_change"][1] >= 8
    assert results["cursor"][0] == [1.0, 2.0]
    assert results["h5api"][0] == [1.0, 2.0]
    producer.close()
    reader.close()


def test_waits_block_in_redis_not_in_a_busy_loop(redis_url, redis_client):
    """A 3 s wait on a 0.4 s socket timeout: a handful of XREAD BLOCK calls of 0.2 s."""
    store = DataStore(redis_url, socket_timeout=0.4)
    redis_client.config_resetstat()
    with pytest.raises(NoScanAvailable):
        store.get_next_scan(timeout=3)
    calls = redis_client.info("commandstats")["cmdstat_xread"]["calls"]
    assert 3 <= calls <= 20, calls  # 15 slices of 0.2 s; a busy loop makes thousands
    store.close()


def test_a_redis_restart_during_a_long_wait(tmp_path):
    """The server stops 2 s into a wait for ever and starts again (same port, empty) 3 s
    later: a follower and the writer service reconnect, get the scan created after the
    restart, and the writer writes it."""
    from writer_helpers import seed_scan, start_writer, wait_status

    with EmbeddedRedis() as server:
        follower = DataStore(server.url)
        service, writing = start_writer(server.url, tmp_path)
        waits = Concurrently()
        waits.run("follower", follower.get_next_scan, None, True, None, "restarted")
        time.sleep(2)
        server.stop()
        time.sleep(3)
        server.start()
        producer = DataStore(server.url)
        time.sleep(1)  # the follower has reconnected and waits again
        scan, _ = seed_scan(producer, tmp_path / "after_restart.h5", npoints=5,
                            session="restarted")
        (since, key), waited = waits.join()["follower"]
        assert key == scan.key and waited >= 6
        assert follower.load_scan(key).state == ScanState.CLOSED  # the same store reads on
        status = wait_status(producer, scan.key, timeout=60)
        assert status.state == "done", status.error
        assert writing.is_alive()
        service.stop()
        writing.join(30)
        producer.close()
        follower.close()


def test_a_redis_that_stays_gone_ends_the_wait_with_a_library_error():
    server = EmbeddedRedis().start()
    forever = DataStore(server.url, reconnect_timeout_s=2)
    bounded = DataStore(server.url)
    scan = _scan(bounded, "gone")
    seen = bounded.load_scan(scan.key)
    waits = Concurrently()
    waits.run("forever", forever.get_next_scan, None, True, None)
    waits.run("bounded", seen.update, True, 4)
    time.sleep(1)
    server.stop()
    results = waits.join()
    for name in ("forever", "bounded"):
        error, _ = results[name]
        assert isinstance(error, RedisUnreachableError), f"{name}: {error!r}"
        assert server.url in str(error) and "unreachable while waiting" in str(error)
    assert results["forever"][1] >= 1 + 2  # reconnect_timeout_s after the loss
    assert results["bounded"][1] >= 4  # the wait's own timeout
    forever.close()
    bounded.close()


def test_bad_wait_arguments_are_reported(store, new_scan):
    scan = new_scan()
    scan.create_stream("diode", dtype="float64")
    scan.prepare()
    with pytest.raises(NoScanAvailable, match="within 0 s"):
        store.get_next_scan(timeout=0)  # nothing new: at once
    with pytest.raises(NoScanAvailable):
        store.get_next_scan(block=False, session="nobody")
    reader = store.load_scan(scan.key)
    assert reader.update(block=True, timeout=0) is False
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a number of seconds >= 0"):
            reader.update(timeout=bad)
        with pytest.raises(ValueError, match="timeout must be"):
            store.get_next_scan(timeout=bad)
        with pytest.raises(ValueError, match="timeout must be"):
            reader.cursor().read(timeout=bad)
        with pytest.raises(ValueError, match="reconnect_timeout_s must be a number of secon"):
            DataStore(store.url, reconnect_timeout_s=bad)


def test_ctrl_c_interrupts_a_wait_for_ever(redis_url, tmp_path):
    script = tmp_path / "follow.py"
    script.write_text(
        "import sys\nfrom blissdata import DataStore\n"
        f"store = DataStore({redis_url!r})\n"
        "print('waiting', flush=True)\n"
        "try:\n"
        "    store.get_next_scan(timeout=None)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    store.redis.ping()  # the connection is usable again\n"
        "    print('usable', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "waiting"
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.split() == ["interrupted", "usable"], out


class CountingTracker(MemoryTracker):
    rounds = 0

    def step(self):
        done = super().step()
        self.rounds += 1
        return done


def test_a_frozen_redis_is_waited_out_by_followers_and_the_memory_tracker():
    """The server stops answering (SIGSTOP) for 7 s, longer than the socket timeout: replies
    time out at the socket. A follower waiting for ever and the memory tracker both carry on
    once it answers again."""
    with EmbeddedRedis() as server:
        follower = DataStore(server.url)
        tracker = CountingTracker(DataStore(server.url), interval_s=0.2)
        tracking = threading.Thread(target=tracker.run)
        tracking.start()
        waits = Concurrently()
        waits.run("follower", follower.get_next_scan, None, True, None, "frozen")
        time.sleep(1)
        server.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(7)
        finally:
            server.process.send_signal(signal.SIGCONT)
        rounds_before = tracker.rounds
        producer = DataStore(server.url)
        created = _scan(producer, "frozen")
        (since, key), _ = waits.join()["follower"]
        assert key == created.key
        deadline = time.monotonic() + 60
        while tracker.rounds <= rounds_before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tracking.is_alive() and tracker.rounds > rounds_before + 1
        tracker.stop()
        tracking.join(30)
        producer.close()
        follower.close()
