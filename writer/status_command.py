"""`blisswriter status [--watch]`: what the writer is doing, read from Redis (any machine)."""

from __future__ import annotations

import sys
import time

import redis

from . import status as writer_status

BAR = 20


def progress_bar(done: int, expected: int | None) -> str:
    if not expected:
        return f"[{'?' * BAR}] {done} pts"
    frac = min(1.0, done / expected)
    full = int(frac * BAR)
    return f"[{'#' * full}{'.' * (BAR - full)}] {done}/{expected}"


def render(statuses: list, now: float | None = None) -> str:
    now = now or time.time()
    if not statuses:
        return "no scan written in the last 24 h"
    lines = [f"{'session':12s} {'scan':>5s} {'name':12s} {'state':8s} {'progress':34s} "
             f"{'MB':>8s} {'MB/s':>7s} {'lag pts':>8s}  age"]
    for st in statuses:
        done = min(st.points.values()) if st.points else 0
        age = now - st.updated
        lines.append(
            f"{st.session[:12]:12s} {st.number:5d} {st.name[:12]:12s} {st.state:8s} "
            f"{progress_bar(done, st.expected_points):34s} {st.bytes_written / 1e6:8.1f} "
            f"{st.write_rate_mb_s if st.state == 'writing' else 0:7.1f} {st.lag_points:8d}  "
            f"{age:.0f}s")
        for warning in st.warnings:
            lines.append(f"{'':19s}warning: {warning}")
        if st.error:
            lines.append(f"{'':19s}ERROR: {st.error}")
        if st.file:
            lines.append(f"{'':19s}{st.file}::/{st.entry}")
    return "\n".join(lines)


def main(url: str, watch: bool = False, interval: float = 1.0) -> int:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        print(f"blisswriter status: cannot reach Redis at {url}: {exc}", file=sys.stderr)
        return 1
    try:
        while True:
            text = render(writer_status.read_recent(client))
            if watch:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S ") + url + "\n" + text,
                      flush=True)
                time.sleep(interval)
            else:
                print(text)
                return 0
    except KeyboardInterrupt:
        return 0
    except redis.RedisError as exc:
        print(f"blisswriter status: lost Redis at {url}: {exc}", file=sys.stderr)
        return 1
