"""Helpers for writer tests: run the real service, publish scans, wait for the writer."""

from __future__ import annotations

import subprocess
import threading
import time

import numpy as np

from blissdata import keys
from writer.state import status as writer_status
from writer.service.config import load_config
from writer.service.service import WriterService

# The seed's example mapping (tuples became lists in JSON).
SEED_MAPPING = [
    {"NX_class": "NXentry"},
    {
        "instrument": [
            {"NX_class": "NXinstrument"},
            {
                "name": [{"short_name": "id00"}, "RAW", "esrf-id00a"],
                "diode": [{"NX_class": "NXdetector"},
                          {"data": [{}, "STREAM", "simulation_diode_sampling_controller:diode"]}],
                "elapsed_time": [{"NX_class": "NXpositioner"},
                                 {"value": [{"units": "s"}, "STREAM", "timer:elapsed_time"]}],
                "epoch": [{"NX_class": "NXpositioner"},
                          {"value": [{"units": "s"}, "STREAM", "timer:epoch"]}],
            },
        ],
        "measurement": [
            {"NX_class": "NXcollection"},
            {
                "diode": [{}, "STREAM", "simulation_diode_sampling_controller:diode"],
                "elapsed_time": [{"units": "s"}, "STREAM", "timer:elapsed_time"],
                "epoch": [{"units": "s"}, "STREAM", "timer:epoch"],
            },
        ],
    },
]
SEED_STREAMS = ("simulation_diode_sampling_controller:diode", "timer:elapsed_time",
                "timer:epoch")


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM (a writer or tracker then stops cleanly), SIGKILL if it is still running
    `timeout` seconds later."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_writer(redis_url, data_root, **overrides):
    """A real WriterService running in a thread; returns (service, thread)."""
    settings = {"max_lag_s": 0.2, "inactivity_timeout_s": 60}
    settings.update(overrides)
    config = load_config(None, redis_url=redis_url, data_roots=[str(data_root)], **settings)
    service = WriterService(config)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    return service, thread


def wait_status(store, scan_key, states=("done", "failed", "skipped"), timeout=20.0):
    """The writer's status of a scan once it is in one of `states`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = writer_status.read(store.redis, scan_key)
        if st is not None and st.state in states:
            return st
        time.sleep(0.02)
    raise AssertionError(f"writer status of {scan_key} not in {states} after {timeout} s: "
                         f"{writer_status.read(store.redis, scan_key)}")


def seed_scan(store, path, number=1, npoints=20, session="test_session", close=True,
              mapping=SEED_MAPPING):
    """Publish the seed's ascan: 3 scalar streams, `npoints` points in batches of 7."""
    scan = store.create_scan(
        {"session": session, "name": "ascan", "number": number, "path": str(path)},
        info={"title": f"ascan roby 0 1 {npoints} 0.1", "type": "ascan", "scan_nb": number,
              "npoints": npoints, "mapping": mapping})
    streams = [scan.create_stream(name, "float64") for name in SEED_STREAMS]
    scan.prepare()
    scan.start()
    data = expected_seed_data(npoints)
    for start in range(0, npoints, 7):
        scan.send_many({s: data[s.name][start:start + 7] for s in streams})
    if close:
        scan.stop()
        scan.close()
    return scan, data


def expected_seed_data(npoints):
    t = np.arange(npoints) * 0.1
    return {SEED_STREAMS[0]: np.sin(t), SEED_STREAMS[1]: t, SEED_STREAMS[2]: 1.7e9 + t}


def durable_points(store, scan_key, stream):
    raw = store.redis.hget(keys.durable_key(scan_key), stream)
    import json

    return json.loads(raw)["points"] if raw else 0


class Lines:
    """The lines a pipe gives, gathered by a thread, so a test can wait for one."""

    def __init__(self, pipe):
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(iter(pipe.readline, "")),
                         daemon=True).start()

    def wait_for(self, predicate, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [line for line in list(self.lines) if predicate(line)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no such line within {timeout} s in {self.lines[-10:]}")
