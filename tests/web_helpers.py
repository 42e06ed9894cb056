"""Helpers for the web viewer's tests: the real `blisswriter serve` and `blisswriter run`
processes, and HTTP requests that return (status, body) whatever the status."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def start_serve(data_roots, redis_url=None, *extra, log_path=None, port=0):
    """`blisswriter serve` on a free port (None: its default); returns (process, base URL)
    once it listens."""
    args = [sys.executable, "-m", "writer.commands.cli", "serve"]
    args += ["--port", str(port)] if port is not None else []
    for root in data_roots:
        args += ["--data-root", str(root)]
    args += ["--redis", redis_url] if redis_url else ["--no-redis"]
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.PIPE,
                            stderr=open(log_path, "wb") if log_path else subprocess.DEVNULL,
                            text=True)
    found = {}

    def read_first_line():
        found["line"] = proc.stdout.readline()

    reader = threading.Thread(target=read_first_line, daemon=True)
    reader.start()
    reader.join(60)
    line = found.get("line", "")
    if not line.startswith("blisswriter serve: http"):
        proc.kill()
        raise AssertionError(f"blisswriter serve did not start: {line!r}, "
                             f"exit code {proc.poll()}")
    return proc, line.split()[2]


def start_writer_process(redis_url, data_root, tmp_path, max_lag_s=0.2):
    """`blisswriter run` as its own process, writing under `data_root`."""
    config = tmp_path / "writer.toml"
    config.write_text(f'data_roots = ["{data_root}"]\nmax_lag_s = {max_lag_s}\n'
                      'inactivity_timeout_s = 60\n')
    proc = subprocess.Popen([sys.executable, "-m", "writer.commands.cli", "run", "--config", str(config),
                             "--redis", redis_url],
                            stdout=open(tmp_path / "writer.log", "ab"), stderr=subprocess.STDOUT)
    time.sleep(1.0)  # the writer subscribes before the first scan is created
    return proc


def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def h5grove(base: str, endpoint: str, file, path: str | None = None, **params):
    """(status, decoded JSON or raw bytes) of an h5grove request."""
    query = {"file": str(file), **({"path": path} if path is not None else {}), **params}
    status, body = get(f"{base}h5grove/{endpoint}/?{urllib.parse.urlencode(query, doseq=True)}")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body
