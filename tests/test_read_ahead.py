"""The writer's read-ahead thread on a real scan: order, end, errors, stop."""

import threading

import numpy as np
import pytest

from blissdata import IndexNoMoreThereError
from writer.scan.read_ahead import ReadAhead


def collect(ahead):
    got = []
    while not ahead.ended:
        for name, view in ahead.get(timeout=1).items():
            got.append((name, view.index, len(view)))
    return got


def test_batches_in_order_then_end(store, new_scan):
    scan = new_scan()
    a = scan.create_stream("a", "float64")
    scan.prepare()
    scan.start()
    for i in range(0, 30, 3):
        a.send(np.arange(i, i + 3, dtype=float))
    scan.close()
    ahead = ReadAhead(scan.cursor(["a"]), count=lambda: 2, name="t")
    got = collect(ahead)
    ahead.close()
    assert [g[1] for g in got] == list(range(0, 30, 6))  # 2 entries of 3 points a read
    assert sum(g[2] for g in got) == 30
    assert ahead.get(timeout=0.01) == {}  # after the end: nothing, no error


def test_read_error_comes_out_of_get(store, new_scan):
    scan = new_scan()
    a = scan.create_stream("a", "float64")
    scan.prepare()
    scan.start()
    for i in range(4):
        a.send([float(i)])
    store.redis.xtrim(a.key, minid="2-0", approximate=False)  # 0, 1 gone, in no file
    ahead = ReadAhead(scan.cursor(["a"]), count=lambda: 10, name="t")
    with pytest.raises(IndexNoMoreThereError, match=r"\[0, 2\)"):
        ahead.get(timeout=5)
    ahead.close()


def test_close_stops_a_blocked_reader(store, new_scan):
    scan = new_scan()
    scan.create_stream("a", "float64")
    scan.prepare()
    scan.start()  # no data: the reader blocks in XREAD
    before = threading.active_count()
    ahead = ReadAhead(scan.cursor(["a"]), count=lambda: 1, name="t")
    assert ahead.get(timeout=0.2) == {}
    ahead.close()
    assert not ahead._thread.is_alive() and threading.active_count() == before


def test_after_a_small_read_the_next_gathers_what_came_meanwhile(store, new_scan):
    scan = new_scan()
    a = scan.create_stream("a", "float64")
    scan.prepare()
    scan.start()
    asked = []

    def gather(views):  # what the writer passes: a pause after a read that brought little
        asked.append({name: len(view) for name, view in views.items()})
        return 2.0

    ahead = ReadAhead(scan.cursor(["a"]), count=lambda: 100, name="t", gather=gather)
    a.send([0.0])
    first = ahead.get(timeout=5)
    for i in range(1, 4):
        a.send([float(i)])
    assert ahead.get(timeout=0.2) == {}  # the reader waits before reading again...
    second = ahead.get(timeout=10)  # ... then takes the three points in one read
    ahead.close()
    assert (first["a"].index, len(first["a"])) == (0, 1)
    assert (second["a"].index, len(second["a"])) == (1, 3) and len(second["a"].parts) == 1
    assert asked[:2] == [{"a": 1}, {"a": 3}]
