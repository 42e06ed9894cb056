"""No Redis password in anything the project prints, logs, serves or writes: a real server
with `requirepass` and an ACL user, every command and daemon run for real with the
password in its URL, every output, log, metric and file gathered, then searched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blissdata import DataStore
from blissdata.redis_server import EmbeddedRedis
from blissdata.redis_url import masked
from writer.service.config import ConfigError, load_config
from writer_helpers import stop_process, wait_status

REQUIREPASS = "Pw0rdRequire7xQ"
ACL_PASSWORD = "acl@Pass42word"  # an unescaped "@", which redis-py takes as the password's
WRONG_PASSWORD = "WrongPw55x"
SECRETS = [REQUIREPASS, ACL_PASSWORD, WRONG_PASSWORD,
           "Pass42word"]  # the last: what a mask cut at the first "@" would leave
SERVER_ARGS = ["--requirepass", REQUIREPASS,
               "--user", "bob", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
    ("redis://admin:p@ss:w@host:6379", "redis://admin:***@host:6379"),
    ("rediss://admin:pw@host", "rediss://admin:***@host"),
    ("redis+cluster://admin:pw@host:7000", "redis+cluster://admin:***@host:7000"),
    ("unix:///run/redis.sock?password=pw&db=1", "unix:///run/redis.sock?password=***&db=1"),
    ("unix://:pw@/run/redis.sock", "unix://:***@/run/redis.sock"),
    ("redis://host:6379", "redis://host:6379"),
    ("redis://admin@host:6379", "redis://admin@host:6379"),
    ("lost redis://:pw@h:1 (and rediss://u:pw2@h:2)",
     "lost redis://:***@h:1 (and rediss://u:***@h:2)"),
])
def test_masked(url, shown):
    assert masked(url) == shown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_in_file(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path} after {timeout} s:\n"
                                 f"{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def run(logs: Path, name: str, *command, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`command` run to its end, its stdout and stderr kept in logs/name.log."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                          env=env, timeout=timeout)
    (logs / f"{name}.log").write_text(f"rc={done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@pytest.mark.parametrize("userinfo", [f":{REQUIREPASS}", f"bob:{ACL_PASSWORD}"],
                         ids=["requirepass", "acl_user"])
def test_no_password_in_any_output_log_metric_or_file(tmp_path, userinfo):
    port, metrics_port = free_port(), free_port()
    url = f"redis://{userinfo}@127.0.0.1:{port}"
    url_shown = masked(url)
    assert url_shown == f"redis://{userinfo.split(':')[0]}:***@127.0.0.1:{port}"
    logs, data = tmp_path / "logs", tmp_path / "data"
    logs.mkdir()
    data.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    config = tmp_path / "writer.toml"  # the input: the only file that holds the password
    config.write_text(f'redis_url = "{url}"\ndata_roots = ["{data}"]\nmax_lag_s = 0.2\n'
                      f'[metrics]\nenabled = true\nport = {metrics_port}\n')
    daemons, server = [], None
    try:
        # the writer first: it waits for Redis, saying where
        writer_log = logs / "writer.log"
        daemons.append(subprocess.Popen(
            [sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
             "--log-level", "DEBUG"], stdout=writer_log.open("w"), stderr=subprocess.STDOUT,
            env=env))
        wait_in_file(writer_log, f"Redis at {url_shown} unreachable while connecting")
        server = EmbeddedRedis(port=port, extra_args=SERVER_ARGS).start()
        wait_in_file(writer_log, f"following every session on {url_shown}")
        tracker_log = logs / "tracker.log"
        daemons.append(subprocess.Popen(
            [sys.executable, "-m", "blissdata.memory_tracker", "--redis", url,
             "--log-level", "DEBUG", "--interval", "0.2"], stdout=tracker_log.open("w"),
            stderr=subprocess.STDOUT, env=env))
        wait_in_file(tracker_log, f"memory tracker on {url_shown}")

        simulated = run(logs, "simulate", BIN / "blissdata-simulate", "ascan", "--redis", url,
                        "--points", "5", "--session", "masking", "--path", data / "sim.h5",
                        env=env)
        assert simulated.returncode == 0, simulated.stderr
        store = DataStore(url)
        (key,) = store.search_scans(session="masking")
        assert wait_status(store, key, timeout=60).state == "done"
        replayed = run(logs, "replay", BIN / "blissdata-replay", data / "sim.h5", "--redis",
                       url, "--session", "masking", "--number", "2", "--path",
                       data / "replayed.h5", env=env)
        assert replayed.returncode == 0, replayed.stderr
        for key in store.search_scans(session="masking"):
            assert wait_status(store, key, timeout=60).state == "done"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
            (logs / "metrics.txt").write_bytes(reply.read())
        assert run(logs, "status", BIN / "blisswriter", "status", "--redis", url,
                   env=env).returncode == 0
        assert run(logs, "status_json", BIN / "blisswriter", "status", "--json", "--all",
                   env={**env, "REDIS_URL": url}).returncode == 0
        watch_log = logs / "status_watch.log"
        watcher = subprocess.Popen([BIN / "blisswriter", "status", "--watch", "--interval",
                                    "0.2", "--redis", url], stdout=watch_log.open("w"),
                                   stderr=subprocess.STDOUT, env=env)
        wait_in_file(watch_log, url_shown)  # its header names the server
        # everything Redis holds, as the project wrote it
        with (logs / "redis_dump.bin").open("wb") as dump:
            for redis_key in store.redis.scan_iter(count=1000):
                dump.write(redis_key + b"\n" + (store.redis.dump(redis_key) or b"") + b"\n")
        store.close()
        wrong = url.replace(userinfo, userinfo.split(":")[0] + ":" + WRONG_PASSWORD)
        with pytest.raises(ConnectionError, match="authentication failed") as caught:
            DataStore(wrong)
        (logs / "wrong_password.log").write_text(f"{caught.value!r} {caught.value}")
        done = run(logs, "status_wrong_password", BIN / "blisswriter", "status", "--redis",
                   wrong, env=env)
        assert done.returncode == 1 and masked(wrong) in done.stderr

        # Redis goes away: the daemons and the watcher say so, naming it
        server.stop()
        wait_in_file(watch_log, f"lost Redis at {url_shown}")
        wait_in_file(tracker_log, f"Redis at {url_shown} unreachable")
        time.sleep(1.0)
        watcher.send_signal(signal.SIGINT)
        watcher.wait(20)

        # errors raised into users' programs, and the commands' own
        errors = []
        for bad in (url, url.replace(str(port), str(free_port())),
                    url.replace("127.0.0.1", "localhost.invalid")):
            with pytest.raises(ConnectionError) as caught:
                DataStore(bad)
            errors.append(f"{caught.value!r} {caught.value}")
        with pytest.raises(ValueError) as caught:
            DataStore(url.replace("redis://", "http://"))
        errors.append(str(caught.value))
        with pytest.raises(ConfigError) as caught:
            load_config(None, redis_url=url.replace("redis://", "http://"))
        errors.append(str(caught.value))
        assert "http://" in errors[-1] and url_shown.split("@")[0][len("redis"):] in errors[-1]
        (logs / "errors.log").write_text("\n".join(errors))
        for command in (["blisswriter", "status"], ["blisswriter", "status", "--watch",
                                                    "--no-wait-for-redis"],
                        ["blissdata-simulate", "ascan"], ["blissdata-replay", data / "sim.h5"],
                        ["blissdata-memory-tracker"], ["blisswriter", "run", "--config",
                                                       config, "--no-wait-for-redis"]):
            name = "down_" + "_".join(str(c).replace("/", "_") for c in command[:2])
            done = run(logs, name, BIN / command[0], *command[1:],
                       env={**env, "REDIS_URL": url})
            assert done.returncode != 0 and url_shown in done.stderr, done.stderr
        for command in ("blisswriter", "blissdata-simulate", "blissdata-replay",
                        "blissdata-memory-tracker"):
            run(logs, f"help_{command}", BIN / command, "--help",
                env={**env, "REDIS_URL": url})
        run(logs, "help_blisswriter_run", BIN / "blisswriter", "run", "--help",
            env={**env, "REDIS_URL": url})
    finally:
        for daemon in daemons:
            stop_process(daemon)
        if server is not None:
            server.stop()

    assert url_shown in writer_log.read_text()
    gathered = [p for folder in (logs, data) for p in folder.rglob("*") if p.is_file()]
    assert {"sim.h5", "replayed.h5", "metrics.txt", "redis_dump.bin"} <= {
        p.name for p in gathered}
    for path in gathered:
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret!r} in {path}"
