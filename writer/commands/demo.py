"""The README's first command: everything started here, real scans written, then a tour.

Starts a private Redis-compatible server, the writer service, the memory tracker and the web
viewer (`blisswriter serve`) as separate processes, publishes several realistic fixtures
through the public API, waits until the writer has finished every file, validates them
against the NeXus definitions, prints the tree of one file and where the files are, then
stops everything it started (`--serve`: after Ctrl-C, the viewer serving meanwhile).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from blissdata import DataStore
from blissdata.redis_server import EmbeddedRedis
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

DEFAULT_FIXTURES = ["ascan", "mesh", "timescan_lima", "mca", "external_frames", "aborted"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _viewer_port(preferred: int = 8765) -> int:
    """`blisswriter serve`'s default port if it is free, else any free one."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port for the web viewer")


def print_tree(group: h5py.Group, indent: str = "  ", depth: int = 3) -> None:
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            nx = item.attrs.get("NX_class", "")
            print(f"{indent}{name}/ {nx}")
            if depth > 1:
                print_tree(item, indent + "  ", depth - 1)
        elif item.shape == ():
            value = item[()]
            value = value.decode() if isinstance(value, bytes) else value
            print(f"{indent}{name} = {str(value)[:60]}")
        else:
            shape = "x".join(map(str, item.shape))
            kind = " virtual" if item.is_virtual else ""
            print(f"{indent}{name}  {item.dtype} [{shape}]{kind}")


def _publish_with_progress(console: Console, store, fixture, name, path, npoints, number):
    """Publish one fixture: a live progress bar on a terminal, one line when piped (a log
    gets no carriage returns or colours)."""
    from blissdata.fixtures import publish

    label = f"   publishing {name:15s}"
    if not console.is_terminal:
        last = {"done": 0, "total": 0}

        def remember(done, total):
            last.update(done=done, total=total)

        published = publish(store, fixture, session="demo", path=str(path), npoints=npoints,
                            progress=remember, number=number)
        print(f"{label} {last['done']:5d}/{last['total']} points", flush=True)
        return published
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("points"))
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(name, total=None)

        def advance(done, total):
            bar.update(task, completed=done, total=total)

        return publish(store, fixture, session="demo", path=str(path), npoints=npoints,
                       progress=advance, number=number)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 dev.py demo", description=__doc__)
    parser.add_argument("--output", help="folder for the files (default: ./demo-output)")
    parser.add_argument("--fixtures", nargs="*", default=DEFAULT_FIXTURES)
    parser.add_argument("--points", type=int, help="points per scan (default: the fixture's)")
    parser.add_argument("--serve", action="store_true",
                        help="after the tour, keep the web viewer (and Redis, the writer) "
                             "running until Ctrl-C")
    args = parser.parse_args(argv)

    from blissdata.fixtures import load_fixture
    from writer.state import status as writer_status
    from writer.commands.status_command import status_table
    from writer.commands.validate import validate_file

    out = Path(args.output or "demo-output").resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    logs = Path(tempfile.mkdtemp(prefix="blissdata-demo-logs-"))
    console = Console(highlight=False)
    with EmbeddedRedis() as server:
        print(f"1. embedded Redis-compatible server: {server.url}")
        writer = _start(["writer.commands.cli", "run", "--redis", server.url, "--data-root", str(out),
                         "--session", "demo"], logs / "writer.log")
        tracker = _start(["blissdata.memory_tracker", "--redis", server.url],
                         logs / "tracker.log")
        port = _viewer_port()
        viewer = _start(["writer.commands.cli", "serve", "--redis", server.url, "--data-root", str(out),
                         "--port", str(port)], logs / "serve.log")
        url = f"http://127.0.0.1:{port}/"
        print(f"2. writer (pid {writer.pid}), memory tracker (pid {tracker.pid}) and web viewer "
              f"(pid {viewer.pid}) started; logs in {logs}")
        print(f"   web viewer: {url}  (open it now: scans show live as they are written)")
        try:
            time.sleep(1.0)
            store = DataStore(server.url)
            scans = []
            for number, name in enumerate(args.fixtures, start=1):
                fixture = load_fixture(name)
                path = out / "demo" / f"{name}.h5"

                scans.extend(_publish_with_progress(console, store, fixture, name, path,
                                                    args.points, number))
            print(f"3. published {len(scans)} scans; waiting for the writer")
            deadline = time.monotonic() + 120
            statuses = {}
            # on a terminal, the writer's progress as `blisswriter status --watch` shows it
            live = Live(console=console, transient=True) if console.is_terminal else None
            with live or contextlib.nullcontext():
                while time.monotonic() < deadline and len(statuses) < len(scans):
                    current = [writer_status.read(store.redis, scan.key) for scan in scans]
                    for scan, st in zip(scans, current):
                        if st is not None and st.finished:
                            statuses[scan.key] = st
                    if live is not None:
                        table = status_table([st for st in current if st],
                                             holders_known=False)  # read() has no holders
                        live.update(table, refresh=True)
                    time.sleep(0.1)
            files = sorted({Path(st.file) for st in statuses.values() if st.file})
            for scan in scans:
                st = statuses.get(scan.key)
                state = st.state if st else "not finished in 120 s"
                extra = f" ({st.error})" if st and st.error else ""
                if st and not st.error:
                    reason = store.load_scan(scan.key).info.get("end_reason")
                    extra = f": {max(st.points.values(), default=0)} points, {reason}"
                print(f"   scan {scan.number:2d} {scan.name:15s} {state}{extra}")
            print("4. NeXus validation (nexusformat):")
            errors = 0
            for path in files:
                report = validate_file(path)
                errors += len(report.errors)
                print(f"   {path.name:22s} {len(report.errors)} errors, "
                      f"{len(report.warnings)} warnings")
                for message in report.errors[:5]:
                    print(f"      error: {message}")
            if files:
                first = Path(statuses[scans[0].key].file) if scans[0].key in statuses \
                    else files[0]
                print(f"5. tree of {first}:")
                with h5py.File(first, "r", locking=False) as f:
                    print_tree(f)
            print(f"6. files written under {out}:")
            for path in files:
                print(f"   {path}  ({path.stat().st_size / 1e6:.2f} MB)")
            ok = len(statuses) == len(scans) and errors == 0 and all(
                st.state == "done" for st in statuses.values())
            print(f"7. the scans in a web browser: {url}  ("
                  + ("serving until Ctrl-C)" if args.serve else
                     "served during the tour; `python3 dev.py demo --serve` keeps it up)"),
                  flush=True)
            if args.serve and viewer.poll() is None:
                with contextlib.suppress(KeyboardInterrupt):
                    while viewer.poll() is None:
                        time.sleep(0.5)
        finally:
            _stop(viewer)
            _stop(tracker)
            _stop(writer)
        print(f"8. viewer, writer, tracker and Redis stopped; browse the files again with "
              f".venv/bin/blisswriter serve --data-root {out}")
        print("All good." if ok else "PROBLEMS above.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
