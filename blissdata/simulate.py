"""`blissdata-simulate FIXTURE`: publish a realistic scan into Redis, as acquisition software
would, through the public API only.

Ctrl-C or SIGTERM ends the scan (USER_ABORT) before exiting (status 130 or 143), so the
writer finishes its file. The scan's file is an absolute path (the writer runs elsewhere):
`--path`, or by default ./data/SESSION/FIXTURE.h5 from the current folder, under the data
root the README gives the writer (`--data-root "$PWD/data"`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .fixtures import FixtureError, check_detector_files, list_fixtures, load_fixture, publish
from .interrupt import Interrupted, stop_on_signals
from .progress import ProgressLine
from .store import DataStore, url_from


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blissdata-simulate", description=__doc__)
    parser.add_argument("fixture", nargs="?", help="fixture name (see --list) or JSON file")
    parser.add_argument("--points", type=int, help="number of points (default: fixture's)")
    parser.add_argument("--rate", type=float, help="points per second (default: full speed)")
    parser.add_argument("--session", default="demo")
    parser.add_argument("--number", type=int, default=1, help="scan number")
    parser.add_argument("--path", help="scan file, an absolute path (default: "
                                       "$PWD/data/SESSION/FIXTURE.h5)")
    parser.add_argument("--redis", help="Redis URL (default: REDIS_URL, then localhost)")
    parser.add_argument("--list", action="store_true", help="list the fixtures and exit")
    args = parser.parse_args(argv)
    if args.list or not args.fixture:
        for name in list_fixtures():
            print(f"{name:16s} {load_fixture(name).get('description', '')}")
        return 0 if args.list else 2
    if args.points is not None and args.points < 1:
        print(f"blissdata-simulate: --points must be >= 1, got {args.points}", file=sys.stderr)
        return 2
    try:
        fixture = load_fixture(args.fixture)
    except FixtureError as exc:
        print(f"blissdata-simulate: {exc}", file=sys.stderr)
        return 2
    if args.path is not None and not os.path.isabs(args.path):
        print(f"blissdata-simulate: --path {args.path} is a relative path; the writer, "
              f"running elsewhere, needs an absolute one (e.g. {Path(args.path).absolute()})",
              file=sys.stderr)
        return 2
    path = args.path or str(Path.cwd() / "data" / args.session
                            / f"{Path(args.fixture).stem}.h5")
    if args.path is None:
        print(f"blissdata-simulate: no --path: the scan's file is {path}", file=sys.stderr)
    try:
        check_detector_files(fixture, path, args.points)
    except FixtureError as exc:
        print(f"blissdata-simulate: {exc}", file=sys.stderr)
        return 2
    url = url_from(args.redis)
    try:
        store = DataStore(url)
    except (ConnectionError, ValueError) as exc:
        print(f"blissdata-simulate: {exc}", file=sys.stderr)
        return 1
    name = fixture["identity"]["name"]

    progress = ProgressLine(name, "points published")
    try:
        with stop_on_signals():
            scans = publish(store, fixture, session=args.session, path=path,
                            npoints=args.points, rate=args.rate, progress=progress,
                            number=args.number)
    except Interrupted as exc:
        progress.close()
        print(exc.message("blissdata-simulate"), file=sys.stderr)
        return exc.exit_status
    progress.close()
    for scan in scans:
        print(f"scan {scan.number} {scan.name} -> {scan.key} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
