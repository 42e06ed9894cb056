"""Seeing what the writer does: `blisswriter status`, metrics, logs."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from writer.commands.cli import main as cli_main
from writer_helpers import seed_scan, start_writer, stop_process, wait_status


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_lists_scans_with_progress(store, data_root, redis_url, capsys):
    service, thread = start_writer(redis_url, data_root)
    try:
        time.sleep(0.1)
        done, _ = seed_scan(store, data_root / "a.h5", number=1, npoints=20, session="sess1")
        running, _ = seed_scan(store, data_root / "b.h5", number=2, npoints=40,
                               session="sess2", close=False)
        assert wait_status(store, done.key).state == "done"
        wait_status(store, running.key, states=("writing",))
        time.sleep(0.5)
        assert cli_main(["status", "--redis", redis_url]) == 0
        out = capsys.readouterr().out
        assert "sess1" in out and "sess2" in out
        assert "━" * 20 in out and "20/20" in out  # finished scan: full bar
        assert "\x1b" not in out and "\r" not in out  # not a terminal: no colours/moves
        assert "/40" in out and "writing" in out
        assert str(data_root / "a.h5") in out
        running.close()
        wait_status(store, running.key)
    finally:
        service.stop()
        thread.join(20)


def test_status_shows_errors(store, data_root, redis_url, tmp_path, capsys):
    service, thread = start_writer(redis_url, data_root)
    try:
        time.sleep(0.1)
        bad, _ = seed_scan(store, tmp_path / "outside.h5", number=3)
        assert wait_status(store, bad.key).state == "failed"
        assert cli_main(["status", "--redis", redis_url]) == 0
        out = capsys.readouterr().out
        assert "ERROR" in out and "outside the data roots" in out
    finally:
        service.stop()
        thread.join(20)


def test_status_redis_unreachable(capsys):
    assert cli_main(["status", "--redis", "redis://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "redis://127.0.0.1:1" in err and "Traceback" not in err


def test_metrics_endpoint(store, data_root, redis_url):
    port = free_port()
    service, thread = start_writer(redis_url, data_root,
                                   metrics={"enabled": True, "port": port, "host": "127.0.0.1"})
    try:
        time.sleep(0.1)
        scan, _ = seed_scan(store, data_root / "m.h5", npoints=30)
        assert wait_status(store, scan.key).state == "done"
        # the scan counts as finished once its thread is done, just after its last status
        deadline = time.monotonic() + 10
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                          timeout=5).read().decode()
            if "blisswriter_scans_active 0.0" in text or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "blisswriter_points_written_total 90.0" in text  # 3 streams x 30 points
        assert 'blisswriter_scans_finished_total{state="done"} 1.0' in text
        assert "blisswriter_scans_active 0.0" in text
        assert "blisswriter_pool_writers_alive 1.0" in text  # the writer pool
        assert "blisswriter_pool_scans_held 0.0" in text
        assert "blisswriter_pool_takeovers_total 0.0" in text
    finally:
        service.stop()
        thread.join(20)


def test_metrics_port_in_use_is_a_clear_error(redis_url, data_root, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    config = tmp_path / "w.toml"
    config.write_text(f'[metrics]\nenabled = true\nport = {port}\nhost = "127.0.0.1"\n')
    try:
        proc = subprocess.run([sys.executable, "-m", "writer.commands.cli", "run", "--config",
                               str(config), "--redis", redis_url, "--data-root",
                               str(data_root)], capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_json_logs_name_the_scan(redis_url, store, data_root, tmp_path):
    log_path = tmp_path / "w.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--redis",
                                 redis_url, "--data-root", str(data_root), "--log-json"],
                                stderr=log, stdout=log)
    try:
        time.sleep(1.0)
        scan, _ = seed_scan(store, data_root / "j.h5", number=5, npoints=4)
        assert wait_status(store, scan.key).state == "done"
    finally:
        stop_process(proc)
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    messages = [r["message"] for r in records]
    assert any(scan.key in m and "done" in m for m in messages)
    assert any(scan.key in m and str(data_root / "j.h5") in m for m in messages)


def test_bad_config_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('max_lag_s = -1\n')
    assert cli_main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_lag_s" in err and str(bad) in err
    bad.write_text('[compression]\ndefault = "zip"\n')
    assert cli_main(["run", "--config", str(bad)]) == 2
    assert "zip" in capsys.readouterr().err


def test_writer_refuses_to_start_without_its_data_roots(tmp_path, capsys, redis_url):
    (tmp_path / "a_file").write_text("")
    for root, problem in ((tmp_path / "missing", "does not exist"),
                          (tmp_path / "a_file", "is not a folder")):
        assert cli_main(["run", "--redis", redis_url, "--data-root", str(tmp_path),
                         "--data-root", str(root)]) == 2
        err = capsys.readouterr().err
        assert f"data root {root} {problem}" in err and "Traceback" not in err
    config = tmp_path / "w.toml"
    config.write_text(f'data_roots = ["{tmp_path}/nowhere"]\n')
    assert cli_main(["run", "--config", str(config), "--redis", redis_url]) == 2
    assert f"configuration {config}: data root {tmp_path}/nowhere does not exist" in \
        capsys.readouterr().err


def test_status_shows_running_and_latest_finished(redis_client, redis_url, capsys):
    """Thousands of scans: running ones and the latest finished by default; filters by
    session, state and count."""
    from writer.state import status as writer_status

    for i in range(40):
        st = writer_status.ScanStatus(f"blissdata:scan:{{many{i}}}", session=f"many{i % 2}",
                                      number=i, name="ct",
                                      state="writing" if i in (3, 4) else "done",
                                      file_bytes=2_000_000, stored_bytes=1_990_000)
        writer_status.publish(redis_client, st)
        time.sleep(0.002)  # distinct update times: "latest" is well defined

    def rows(*args):
        assert cli_main(["status", "--redis", redis_url, *args]) == 0
        out = capsys.readouterr().out
        return out, [line.split()[1] for line in out.splitlines()
                     if line.startswith(("many0 ", "many1 "))]

    out, numbers = rows("--session", "many0")
    assert numbers == ["4"] + [str(i) for i in range(20, 40, 2)]
    assert "9 older finished scans not shown" in out
    assert "0.5%" in out  # the file's bytes that are not data
    _, numbers = rows("--session", "many1", "--last", "3")
    assert numbers == ["3", "35", "37", "39"]
    _, numbers = rows("--state", "writing", "--all")
    assert "3" in numbers and "4" in numbers and len(numbers) == 2
    _, numbers = rows("--all")
    assert len(numbers) == 40
    with pytest.raises(SystemExit):
        cli_main(["status", "--redis", redis_url, "--last", "-1"])
    assert "must be 0 or more" in capsys.readouterr().err
