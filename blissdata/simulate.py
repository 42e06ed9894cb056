"""`blissdata-simulate FIXTURE`: publish a realistic scan into Redis, as acquisition software
would, through the public API only."""

from __future__ import annotations

import argparse
import os
import sys

from .fixtures import FixtureError, list_fixtures, load_fixture, publish
from .progress import ProgressLine
from .store import DataStore, url_from


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="blissdata-simulate", description=__doc__)
    parser.add_argument("fixture", nargs="?", help="fixture name (see --list) or JSON file")
    parser.add_argument("--points", type=int, help="number of points (default: fixture's)")
    parser.add_argument("--rate", type=float, help="points per second (default: full speed)")
    parser.add_argument("--session", default="demo")
    parser.add_argument("--number", type=int, default=1, help="scan number")
    parser.add_argument("--path", help="scan file (default /tmp/blissdata/SESSION/FIXTURE.h5)")
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
    url = url_from(args.redis)
    try:
        store = DataStore(url)
    except (ConnectionError, ValueError) as exc:
        print(f"blissdata-simulate: {exc}", file=sys.stderr)
        return 1
    name = fixture["identity"]["name"]
    path = args.path or f"/tmp/blissdata/{args.session}/{os.path.basename(args.fixture)}.h5"

    progress = ProgressLine(name, "points published")
    scans = publish(store, fixture, session=args.session, path=path, npoints=args.points,
                    rate=args.rate, progress=progress, number=args.number)
    progress.close()
    for scan in scans:
        print(f"scan {scan.number} {scan.name} -> {scan.key} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
