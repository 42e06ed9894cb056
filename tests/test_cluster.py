"""The stack on a real Redis Cluster (3 primaries, from the same valkey-server binary): a
subset of the core, writer, reader, replay, tracker and pool tests, run again with
``redis+cluster://`` (conftest's redis_client flushes every primary), and what a failover
does to a scan in flight."""

import time

import h5py
import numpy as np
import pytest
import redis
import redis.cluster

from blissdata import DataStore, EndReason, keys
from blissdata.memory_tracker import MemoryTracker
from blissdata.redis_server import EmbeddedCluster

# The same tests, with this module's redis_url / redis_client fixtures (a cluster).
from test_core import (test_cursor_many_streams_and_end, test_every_encoding_round_trips,  # noqa: F401
                       test_last_scan_search_and_delete, test_next_scan_misses_none_between_calls,
                       test_protocol_version_is_checked, test_reader_waits_for_states,
                       test_send_bad_dtype_or_shape_writes_nothing, test_state_machine_and_end_reason,
                       test_two_scans_interleaved)
from test_archive import (round_trips, test_archived_scan_has_the_live_surface,  # noqa: F401
                          test_foreign_file_replays_what_it_can,
                          test_replay_round_trip_gives_identical_data)
from test_h5api import test_while_written_trimmed_and_after  # noqa: F401
from test_memory_tracker import (test_closed_scans_expire_and_inactive_ones_go,  # noqa: F401
                                 test_hard_limit_trims_and_records_the_loss,
                                 test_never_trims_above_the_watermark,
                                 test_scan_larger_than_redis_is_written_and_read_back)
from test_writer import (test_frames_raw_and_precompressed,  # noqa: F401
                         test_scan_deleted_mid_way, test_seed_scan_written_as_nexus,
                         test_several_sessions_and_scans_in_one_file, writer)
from test_writer_pool import test_kill_9_writer_holding_running_scans, writers  # noqa: F401
from writer_helpers import seed_scan, start_writer, wait_status


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedCluster(masters=3) as cluster:
        yield cluster.url


@pytest.fixture
def small_redis():
    """A cluster whose nodes have 48 MB each (a scan lives on one of them)."""
    with EmbeddedCluster(masters=3, maxmemory=48 * 2**20) as cluster:
        yield cluster.url


def test_cluster_url_gives_a_cluster_client(store):
    assert isinstance(store.redis, redis.cluster.RedisCluster)
    assert len(store.redis.get_primaries()) == 3


def test_scans_spread_over_the_nodes(store, new_scan):
    """Each scan's keys share a slot; different scans land on different primaries; the
    global keys work from any of them."""
    scans = [new_scan(number=n) for n in range(30)]
    nodes = {store.redis.get_node_from_key(s.key).name for s in scans}
    assert len(nodes) == 3
    for scan in scans:
        slot = store.redis.keyslot(scan.key)
        assert store.redis.keyslot(keys.state_key(scan.key)) == slot
        assert store.redis.keyslot(keys.data_key(scan.key, "x")) == slot
        assert store.redis.keyslot(keys.lease_key(scan.key)) == slot
    assert store.search_scans() == [s.key for s in scans]
    assert store.get_last_scan() == scans[-1].key


def test_tracker_reads_every_primary(store, new_scan):
    """used_memory() is the fullest primary's (each primary has its own maxmemory): 16 MB put
    on one node show, whichever node it is. (used_memory moves by a few kB between two
    INFO calls, so the figures are compared with a margin.)"""
    MB = 2**20
    big = "probe:{fullest}"
    store.redis.set(big, b"x" * (16 * MB))
    try:
        per_node = store.redis.info("memory", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
        used_by_node = sorted(int(i["used_memory"]) for i in per_node.values())
        used = store.used_memory()
        assert used > 16 * MB and abs(used - used_by_node[-1]) < MB
        assert used_by_node[-2] < 16 * MB  # the others: far below (not a sum, not the first)
    finally:
        store.redis.delete(big)
    assert MemoryTracker(store, budget_bytes=2**40).step()["trimmed_entries"] == 0


def test_tracker_refuses_a_hard_limit_below_an_idle_node(store):
    """`--budget 1` gives a 1.5 MB hard limit, below what an idle cluster node uses: every
    point would be lost, so the tracker does not start."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "blissdata.memory_tracker", "--redis",
                           store.url, "--budget", "1"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "with no scan data" in done.stderr, done.stderr


def test_writer_status_on_cluster(store, redis_url, tmp_path, capsys):
    from writer.commands.cli import main as cli_main

    root = tmp_path / "data"
    root.mkdir()
    service, thread = start_writer(redis_url, root)
    try:
        time.sleep(0.2)
        scan, data = seed_scan(store, root / "c.h5")
        assert wait_status(store, scan.key).state == "done"
        assert cli_main(["status", "--redis", redis_url]) == 0
        out = capsys.readouterr().out
        assert " alive " in out and "done" in out
    finally:
        service.stop()
        thread.join(30)


def test_failover_mid_scan(tmp_path):
    """A primary holding a running scan is killed; its replica takes over its slots. What
    was replicated before the kill survives; the producer's and the writer's commands fail
    while no primary serves the slot and work again after the failover; the writer resumes
    the scan from its file and the watermark."""
    with EmbeddedCluster(masters=3, replicas=1, node_timeout_ms=500) as cluster:
        store = DataStore(cluster.url)
        root = tmp_path / "data"
        root.mkdir()
        service, thread = start_writer(cluster.url, root, lease_ttl_s=2.0)
        try:
            time.sleep(0.3)
            scan = store.create_scan({"session": "s", "name": "ascan", "number": 1,
                                      "path": str(root / "f.h5")},
                                     info={"title": "failover", "type": "ascan", "scan_nb": 1})
            diode = scan.create_stream("diode", "float64")
            scan.prepare()
            scan.start()
            values = np.arange(400.0)
            diode.send(values[:200])
            deadline = time.monotonic() + 20
            while (diode.file_backing or {}).get("points", 0) < 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            primary = cluster.primary_of(scan.key)
            with cluster.client(primary) as c:
                c.execute_command("WAIT", 1, 2000)  # replicated before the kill
            primary.process.kill()
            primary.process.wait()
            sent, deadline, longest = 200, time.monotonic() + 30, 0.0
            while sent < 400:  # the producer retries until the replica serves the slot
                try:
                    t0 = time.monotonic()
                    diode.send(values[sent:sent + 50])
                    longest = max(longest, time.monotonic() - t0)
                    sent += 50
                except (redis.ConnectionError, redis.TimeoutError,
                        redis.exceptions.ClusterError) as exc:
                    print("send refused during the failover:", type(exc).__name__, exc)
                    assert time.monotonic() < deadline, "no failover"
                    time.sleep(0.2)
            assert cluster.primary_of(scan.key) is not primary
            print(f"longest send during the failover: {longest:.2f} s")
            scan.stop()
            scan.close(EndReason.SUCCESS)
            st = wait_status(store, scan.key, timeout=60)
            assert st.state == "done", st.error
            with h5py.File(root / "f.h5", "r", locking=False) as f:
                assert np.array_equal(f["1.1/measurement/diode"][()], values)
        finally:
            service.stop()
            thread.join(30)
            store.close()
