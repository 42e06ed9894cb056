"""`blisswriter status [--watch] [--json] [--wait SCAN]`: what the writer is doing, read from
Redis (any machine).

Drawn with `rich`: a table with a progress bar per scan, redrawn in place with `--watch` on a
terminal; plain text without colours or cursor moves when the output is piped (one table per
refresh then). `--json` prints the statuses as JSON (one line per refresh with `--watch`) for
scripts. `--watch` survives a Redis restart: it says so and reconnects. On a terminal
narrower than WIDE_COLUMNS the table keeps the columns that say which scan and how far
(session, scan, name, state, progress, points, age) and drops the byte counts.
`--wait SCAN` (writer/commands/scan_wait.py) waits for one scan to be done or failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from blissdata.redis_url import masked
from blissdata.store import client_from_url

from ..state import status as writer_status
from ..state.pool import read_writers
from ..state.status import done_points, select

MIN_INTERVAL_S = 0.1  # below this a watch would only load Redis and the terminal
BAR = 20
WIDE_COLUMNS = 120  # narrower terminals get the compact table
NO_WRITER = "no writer"  # the state column of an unfinished scan no live writer holds
RETRY_MAX_S = 5.0  # longest wait between reconnection attempts


def check_interval(text: str) -> float:
    """`--interval` as argparse type: seconds, at least MIN_INTERVAL_S (refused, not clamped:
    the user asked for something else and should know)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= MIN_INTERVAL_S:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INTERVAL_S} s, got {text}")
    return value


def check_count(text: str) -> int:
    """argparse type of --last: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def nothing_found(session: str | None = None, state: str | None = None) -> str:
    """What an empty table says: which filter matched nothing."""
    what = f"no {state} scan" if state else "no scan"
    if session:
        what += f" of session {session!r}"
    return f"{what} in the last 24 h"


def shown_state(st: writer_status.ScanStatus, holders_known: bool = True) -> str:
    """The state column: an unfinished scan that no live writer holds says so (its last
    status is stale: the writer stopped or died; another takes it over when one runs).
    `holders_known`: ``held_by`` was read (writer_status.read_recent)."""
    return NO_WRITER if holders_known and not st.finished and not st.held_by else st.state


def status_table(statuses: list, now: float | None = None, wide: bool = True,
                 empty: str = "no scan written in the last 24 h", holders_known: bool = True):
    """A rich renderable: one row per scan, then its file, warnings and error. Not `wide`:
    without the byte counts, for an 80-column terminal. `holders_known`: see shown_state."""
    now = now or time.time()
    if not statuses:
        return Text(empty)
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("session", overflow="fold")  # long words wrap, never cut
    table.add_column("scan", justify="right", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("progress", min_width=8 if wide else 4, max_width=BAR)  # a bar shrinks
    numbers = ("points", "MB", "MB/s", "lag pts", "file MB", "not data", "age") if wide \
        else ("points", "age")
    for name in numbers:
        table.add_column(name, justify="right", no_wrap=True)  # numbers never wrap
    notes = []
    for st in statuses:
        done = done_points(st)
        bar = (ProgressBar(total=st.expected_points, completed=done)
               if st.expected_points else Text("?" * BAR, overflow="crop"))
        points = f"{done}/{st.expected_points}" if st.expected_points else f"{done}"
        shown = shown_state(st, holders_known)
        state = Text(shown, style={"failed": "red", "done": "green", "writing": "cyan",
                                   NO_WRITER: "yellow"}.get(shown, ""))
        rate = st.write_rate_mb_s if st.state == "writing" else 0.0
        # the file's bytes that are not its datasets' data (HDF5 metadata and anything
        # left behind): known once the scan is done
        other = (f"{100 * (st.file_bytes - st.stored_bytes) / st.file_bytes:.1f}%"
                 if st.file_bytes else "")
        sizes = (f"{st.bytes_written / 1e6:.1f}", f"{rate:.1f}", str(st.lag_points),
                 f"{st.file_bytes / 1e6:.1f}" if st.file_bytes else "", other) if wide else ()
        table.add_row(st.session, str(st.number), st.name, state, bar, points, *sizes,
                      f"{now - st.updated:.0f}s")
        where = f"{st.session}:{st.number} {st.name}"
        if st.file:
            notes.append(Text(f"{where}: {st.file}::/{st.entry}"))
        for warning in st.warnings:
            notes.append(Text(f"{where}: warning: {warning}", style="yellow"))
        if st.error:
            notes.append(Text(f"{where}: ERROR: {st.error}", style="red"))
        if not st.finished and holders_known:  # the writer pool: who has it now
            notes.append(Text(f"{where}: held by writer {st.held_by}" if st.held_by else
                              f"{where}: held by no writer (waiting for one to take it)"))
    return Group(table, *notes)


def writers_table(writers: list, now: float | None = None):
    """The writers of the pool (writer/state/pool.py): id (host:pid), last heartbeat, scans held."""
    now = now or time.time()
    if not writers:
        return Text("no writer registered")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for name in ("writer", "state", "heartbeat", "scans held"):
        table.add_column(name, justify="left" if name in ("writer", "state") else "right")
    for w in writers:
        table.add_row(w["id"], Text("alive", style="green") if w["alive"] else
                      Text("silent", style="yellow"), f"{now - w['heartbeat']:.1f}s ago",
                      str(len(w["scans"])))
    return table


def view(statuses: list, writers: list, left_out: int = 0, wide: bool = True,
         empty: str = "no scan written in the last 24 h"):
    """What `status` draws: the writers, then the scans."""
    parts = [writers_table(writers), Text(""), status_table(statuses, wide=wide, empty=empty)]
    if left_out:
        parts.append(Text(f"{left_out} older finished scans not shown (--last N, --all)",
                          style="dim"))
    return Group(*parts)


def statuses_json(statuses: list) -> str:
    return json.dumps([asdict(st) for st in statuses])


def main(url: str, watch: bool = False, interval: float = 1.0, as_json: bool = False,
         console: Console | None = None, session: str | None = None, state: str | None = None,
         last: int | None = 10, wait_for_redis: bool = True) -> int:
    """`blisswriter status`: scans not finished and the ``last`` finished (None: all of the
    last 24 h), of ``session`` and in ``state`` if given. With ``watch``, a Redis unreachable
    at start is waited for as one lost later (unless not ``wait_for_redis``)."""
    console = console or Console(highlight=False)
    read = lambda: select(writer_status.read_recent(client), session, state, last)  # noqa: E731
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log line is not wrapped at 80 columns

    def draw(statuses, writers, left_out):  # at the width of the terminal now (it may change)
        return view(statuses, writers, left_out, wide=console.width >= WIDE_COLUMNS,
                    empty=nothing_found(session, state))
    try:  # a RedisCluster for redis+cluster:// URLs
        client = client_from_url(url, socket_connect_timeout=2, socket_timeout=10)
        statuses, left_out = read()
        writers = read_writers(client)
    except (redis.RedisError, redis.RedisClusterException, OSError, ValueError) as exc:
        lost = isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)) and \
            not isinstance(exc, redis.AuthenticationError)
        waits = watch and wait_for_redis and lost
        print(f"blisswriter status: cannot reach Redis at {masked(url)}: {masked(exc)}"
              + ("; waiting for it" if waits else ""), file=sys.stderr, flush=True)
        if not waits:
            return 1
        client = client_from_url(url, socket_connect_timeout=2, socket_timeout=10)
        statuses = left_out = writers = None  # shown once Redis answers
    if not watch:
        if as_json:
            print(statuses_json(statuses))
        else:
            console.print(draw(statuses, writers, left_out))
        return 0
    try:
        _watch(read, client, masked(url), interval, as_json, console, (statuses, left_out),
               writers, draw, lost_since=time.time() if statuses is None else None)
    except KeyboardInterrupt:
        pass
    except redis.RedisError as exc:  # not a lost connection: an answer we cannot use
        print(f"blisswriter status: Redis at {masked(url)}: {exc}", file=sys.stderr)
        return 1
    return 0


def _watch(read, client, url: str, interval: float, as_json: bool, console: Console,
           shown: tuple, writers: list, draw, lost_since: float | None = None) -> None:
    """Refresh until Ctrl-C; a lost connection is said once, retried with backoff, and its
    end said too. `url`: as shown (masked). `lost_since`: Redis unreachable since then
    (at start: said already)."""
    live = Live(console=console, auto_refresh=False) if (
        console.is_terminal and not as_json) else None
    retry_s = interval
    statuses, left_out = shown
    with live or contextlib.nullcontext():
        while True:
            if statuses is not None:
                header = Text(time.strftime("%H:%M:%S ") + url, style="bold")
                if as_json:
                    print(statuses_json(statuses), flush=True)
                elif live is not None:
                    live.update(Group(header, draw(statuses, writers, left_out)),
                                refresh=True)
                else:
                    console.print(header, draw(statuses, writers, left_out), "")
                time.sleep(interval)
            try:
                statuses, left_out = read()
                writers = read_writers(client)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                statuses = None
                if lost_since is None:
                    lost_since = time.time()
                    message = f"blisswriter status: lost Redis at {url} ({exc}); reconnecting"
                    if live is not None:
                        live.update(Text(message, style="red"), refresh=True)
                    else:
                        print(message, file=sys.stderr, flush=True)
                time.sleep(retry_s)
                retry_s = min(RETRY_MAX_S, retry_s * 2)
                continue
            if lost_since is not None:
                print(f"blisswriter status: Redis at {url} is back after "
                      f"{time.time() - lost_since:.0f} s", file=sys.stderr, flush=True)
                lost_since, retry_s = None, interval
