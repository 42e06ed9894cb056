"""`blisswriter status --wait SCAN`: wait until the writer has finished one scan, for scripts
(instead of grepping the table, where an older scan's "done" matches at once).

SCAN is a scan key (as `blissdata-simulate` prints it) or a scan number: then the most
recently created scan with that number (of `--session` if given; a number found in several
sessions needs `--session`). A scan not known yet is waited for (a producer may create it
just after); a lost connection is retried until the timeout.

Exit status: 0 done, 1 failed, 2 bad argument (SCAN unknown at the timeout is 3),
3 timeout, 4 skipped (its info says "save": false, no file), 5 Redis cannot be reached.
"""

from __future__ import annotations

import sys
import time

import redis

from blissdata.store import DataStore

from ..state import status as writer_status

EXIT_CODES = {"done": 0, "failed": 1, "skipped": 4}
EXIT_BAD_ARGUMENT, EXIT_TIMEOUT, EXIT_NO_REDIS = 2, 3, 5
POLL_S = 0.2


class WaitError(ValueError):
    """SCAN names no scan that can be waited for (the message says why)."""


def find_scan(store: DataStore, scan: str, session: str | None) -> str | None:
    """The key of the scan SCAN names, or None if none (yet)."""
    if not scan.isdigit():
        return scan  # a key: waited for even before the writer lists it
    found = store.search_scans(session=session, number=int(scan))
    if not found:
        return None
    sessions = {store.load_scan(key).session for key in found} if session is None else set()
    if len(sessions) > 1:
        raise WaitError(f"scan number {scan} is in sessions {sorted(sessions)}: give "
                        f"--session")
    return found[-1]  # the most recently created


def main(url: str, scan: str, session: str | None = None, timeout: float | None = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    what = f"scan {scan}" + (f" of session {session!r}" if session else "")
    try:
        store = DataStore(url)
    except (ConnectionError, ValueError, redis.RedisError) as exc:
        print(f"blisswriter status --wait: {exc}", file=sys.stderr)
        return EXIT_NO_REDIS
    key, status, lost = None, None, False
    try:
        while deadline is None or time.monotonic() < deadline:
            try:
                key = key or find_scan(store, scan, session)
                status = writer_status.read(store.redis, key) if key else None
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if not lost:
                    print(f"blisswriter status --wait: lost Redis ({exc}); retrying",
                          file=sys.stderr, flush=True)
                lost = True
                time.sleep(1.0)
                continue
            if status is not None and status.state in EXIT_CODES:
                where = f": {status.file}::/{status.entry}" if status.file else ""
                error = f" ({status.error})" if status.error else ""
                print(f"{what} {key}: {status.state}{where}{error}", flush=True)
                return EXIT_CODES[status.state]
            time.sleep(POLL_S)
    except WaitError as exc:
        print(f"blisswriter status --wait: {exc}", file=sys.stderr)
        return EXIT_BAD_ARGUMENT
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()
    if key is None:
        print(f"blisswriter status --wait: no {what} in Redis within {timeout} s",
              file=sys.stderr)
    else:
        state = status.state if status else "not taken by a writer yet"
        print(f"blisswriter status --wait: {what} {key} not finished within {timeout} s "
              f"(state {state})", file=sys.stderr)
    return EXIT_TIMEOUT
