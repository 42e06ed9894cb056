"""`blisswriter end SCAN [--reason FAILURE] [--message TEXT]`: end a scan whose producer died
(killed -9, its host lost), which would otherwise stay open (`writing 14/100`) until it is
deleted from Redis. Its streams are sealed after the points they hold and the scan is
CLOSED with the reason (Scan.end_abandoned); the writer then finishes the file as for any
scan, with that end_reason in the entry.

Exit status: 0 ended, 1 already closed, 2 no such scan (or a bad argument), 5 Redis cannot
be reached.
"""

from __future__ import annotations

import sys

import redis

from blissdata.exceptions import BlissdataError, ScanNotFoundError, ScanStateError
from blissdata.store import DataStore

from .scan_wait import EXIT_NO_REDIS, WaitError, find_scan


def main(url: str, scan: str, session: str | None = None, reason: str = "FAILURE",
         message: str = "") -> int:
    try:
        store = DataStore(url)
    except (ConnectionError, ValueError, redis.RedisError) as exc:
        print(f"blisswriter end: {exc}", file=sys.stderr)
        return EXIT_NO_REDIS
    try:
        key = find_scan(store, scan, session)
        if key is None:
            raise ScanNotFoundError(f"no scan numbered {scan}"
                                    + (f" in session {session!r}" if session else ""))
        found = store.load_scan(key)
        found.end_abandoned(reason, message)
        points = min((len(stream) for stream in found.streams.values()), default=0)
    except ScanStateError as exc:
        print(f"blisswriter end: {exc}", file=sys.stderr)
        return 1
    except (ScanNotFoundError, WaitError) as exc:
        print(f"blisswriter end: {exc.args[0]}", file=sys.stderr)
        return 2
    except (BlissdataError, redis.RedisError) as exc:
        print(f"blisswriter end: scan {scan}: {exc}", file=sys.stderr)
        return EXIT_NO_REDIS if isinstance(exc, redis.ConnectionError) else 1
    finally:
        store.close()
    print(f"scan {found.session}:{found.number} {found.name} ({key}) ended {reason} with "
          f"{points} points; the writer finishes its file "
          f"(blisswriter status --wait {key})")
    return 0
