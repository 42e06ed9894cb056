"""A paused scan with a real writer process: idle, the writer killed (-9) and restarted while
it is idle, then the scan goes on: every point lands in the one entry."""

import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from writer_helpers import SEED_STREAMS, expected_seed_data, seed_scan, stop_process, wait_status


def test_writer_restarted_while_a_scan_is_idle_resumes_it(store, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    config = tmp_path / "w.toml"
    config.write_text("inactivity_timeout_s = 0.5\nmax_lag_s = 0.2\n")
    log = open(tmp_path / "writer.log", "ab")

    def start():
        return subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--config",
                                 str(config), "--redis", store.url, "--data-root", str(root)],
                                stdout=log, stderr=subprocess.STDOUT)

    proc = start()
    try:
        time.sleep(1.0)  # the service subscribes
        scan, _ = seed_scan(store, root / "p.h5", close=False, npoints=8)
        assert wait_status(store, scan.key, states=("idle", "failed")).state == "idle"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = start()
        time.sleep(1.0)
        more = expected_seed_data(20)
        scan.send_many({scan.streams[n]: more[n][8:] for n in SEED_STREAMS})
        scan.stop()
        scan.close()
        status = wait_status(store, scan.key, timeout=30)
        assert status.state == "done", (status.error, (tmp_path / "writer.log").read_text())
        assert "resumed after a writer restart" in status.warnings
        with h5py.File(root / "p.h5", "r", locking=False) as f:
            assert list(f) == ["1.1"]
            assert np.array_equal(f["1.1/measurement/diode"][()], more[SEED_STREAMS[0]])
    finally:
        stop_process(proc)
        log.close()
