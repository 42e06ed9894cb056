"""A scan deleted (or expired) while its producer still sends: the producer learns it at
once, nothing is written, and no key of the scan is left behind in Redis."""

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from blissdata import ScanNotFoundError, bslz4, keys
from blissdata.exceptions import StreamError
from blissdata.memory_tracker import MemoryTracker


def scan_keys(redis_client, scan):
    return sorted(k.decode() for k in redis_client.scan_iter(match=scan.key + "*"))


def started(new_scan, **streams):
    scan = new_scan()
    made = {name: scan.create_stream(name, **kw) for name, kw in streams.items()}
    scan.prepare()
    scan.start()
    return scan, made


def test_every_send_to_a_deleted_scan_fails_and_writes_nothing(store, new_scan, redis_client):
    scan, s = started(new_scan, diode={"dtype": "float64"},
                      cam={"dtype": "uint16", "shape": (8, 8), "encoding": "bslz4"},
                      spare={"dtype": "int32"})  # never sent to before the deletion
    s["diode"].send(np.arange(5.0))
    store.delete_scan(scan.key)
    assert scan_keys(redis_client, scan) == []
    frame = np.ones((8, 8), np.uint16)
    attempts = [lambda: s["diode"].send(np.arange(3.0)),
                lambda: s["spare"].send(np.arange(3)),
                lambda: scan.send_many({s["diode"]: [1.0], s["spare"]: [2]}),
                lambda: s["cam"].send_chunks([bslz4.compress(frame)]),
                lambda: s["cam"].send(frame),
                s["spare"].seal,
                lambda: scan.close()]
    for attempt in attempts:
        with pytest.raises(ScanNotFoundError, match="no longer exists"):
            attempt()
        assert scan_keys(redis_client, scan) == []


def test_send_removes_keys_an_older_producer_left(store, new_scan, redis_client):
    scan, s = started(new_scan, diode={"dtype": "float64"})
    s["diode"].send(np.arange(5.0))
    store.delete_scan(scan.key)
    # a producer of an older version recreates the stream key with a plain XADD
    redis_client.xadd(s["diode"].key, {"n": 1, "d": np.zeros(1).tobytes()}, id="5-1")
    with pytest.raises(ScanNotFoundError):
        s["diode"].send(np.arange(2.0))
    assert scan_keys(redis_client, scan) == []


def test_streams_of_a_live_scan_are_unchanged(store, new_scan, redis_client):
    """The guard creates a stream key only together with its first entry."""
    scan, s = started(new_scan, diode={"dtype": "float64"}, idle={"dtype": "float64"})
    assert not redis_client.exists(s["diode"].key, s["idle"].key)
    s["diode"].send(np.arange(4.0))
    assert redis_client.xlen(s["diode"].key) == 1 and not redis_client.exists(s["idle"].key)
    assert not redis_client.xinfo_groups(s["diode"].key)  # the guard's group is gone
    scan.close()
    assert len(s["idle"]) == 0 and s["idle"].sealed and list(s["diode"][:]) == [0, 1, 2, 3]


def test_memory_tracker_removes_orphaned_scan_keys(store, new_scan, redis_client):
    kept, s = started(new_scan, diode={"dtype": "float64"})
    s["diode"].send(np.arange(3.0))
    gone, g = started(new_scan, diode={"dtype": "float64"})
    g["diode"].send(np.arange(3.0))
    store.delete_scan(gone.key)
    # what an older producer and a late writer status would leave behind
    redis_client.xadd(g["diode"].key, {"n": 1, "d": np.zeros(1).tobytes()}, id="3-1")
    redis_client.hset(keys.writer_key(gone.key), "status", "{}")
    tracker = MemoryTracker(store, budget_bytes=1 << 40)
    done = tracker.step()
    assert done["orphan_keys"] == 2
    assert scan_keys(redis_client, gone) == []
    assert scan_keys(redis_client, kept) == sorted(  # a live scan: untouched
        [kept.key, keys.state_key(kept.key), s["diode"].key])
    assert tracker.step()["orphan_keys"] == 0  # the next sweep waits orphan_interval_s


PRODUCER = textwrap.dedent("""
    import sys, numpy as np
    from blissdata import DataStore, ScanNotFoundError
    store = DataStore(sys.argv[1])
    scan = store.create_scan({"session": "s", "name": "loop", "number": 1, "path": "/x.h5"},
                             info={"title": "loop", "type": "loop", "scan_nb": 1})
    a = scan.create_stream("a", "float64")
    b = scan.create_stream("b", "uint16", shape=(16, 16))
    scan.prepare(); scan.start()
    print(scan.key, flush=True)
    sent = 0
    try:
        while sent < 50_000:  # bounded: the old library never stopped
            scan.send_many({a: np.arange(10.0), b: np.ones((10, 16, 16), np.uint16)})
            sent += 10
    except ScanNotFoundError as exc:
        print("refused after", sent, ":", exc, flush=True)
        sys.exit(3)
""")


def test_producer_process_stops_at_once_when_another_deletes_its_scan(store, redis_url,
                                                                      redis_client):
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, redis_url],
                                stdout=subprocess.PIPE, text=True)
    try:
        key = producer.stdout.readline().strip()
        deadline = time.monotonic() + 30
        stream = store.load_scan(key).streams["a"]
        while len(stream) < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        store.delete_scan(key)  # while the producer sends
        assert producer.wait(30) == 3
        assert "refused after" in producer.stdout.read()
    finally:
        producer.kill()
        producer.wait()
    assert sorted(k.decode() for k in redis_client.scan_iter(match=key + "*")) == []


def test_a_stream_key_removed_by_hand_is_an_error_not_a_silent_loss(new_scan, redis_client):
    scan, s = started(new_scan, diode={"dtype": "float64"})
    s["diode"].send(np.arange(3.0))
    redis_client.delete(s["diode"].key)
    with pytest.raises(StreamError, match="were removed from Redis while the scan exists"):
        s["diode"].send(np.arange(3.0))
