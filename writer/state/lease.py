"""Leases: which writer process may write which file and which scan (docs/protocol.md,
"Writer pool").

A lease is a Redis string holding its holder's token, with an expiry. It is taken with
``SET key token NX PX ttl`` and renewed or released by a Lua script only while it still holds
that token, so a writer can never renew or drop a lease another writer took meanwhile.

A writer holds a lease on each file it writes and, with the same token, one on each scan it
writes into that file (``<scan>:lease``, in the scan's hash slot, so the scripts that publish
the scan's watermark and status can check the token atomically). The holder renews them all
every ``ttl / 5``. Locally it counts its leases valid for ``VALID_FRACTION`` of the ttl after
the start of the last renewal that succeeded; past that, ``check()`` renews before saying yes.
A writer paused (SIGSTOP), cut off from Redis, or too slow to renew thus finds out before its
next write and stops writing that file: :class:`LeaseLostError`.
"""

from __future__ import annotations

import hashlib
import threading
import time

import redis

from blissdata import keys
from blissdata.exceptions import LeaseLostError

__all__ = ["FileLease", "ScanLease", "LeaseLostError", "file_lease_key"]

VALID_FRACTION = 0.8  # margin for clock rates and for the write that follows a check

# Taking a lease must work while Redis is full (maxmemory): a writer restarted then must
# take its scans to publish the watermarks that let the memory tracker make room.
_TAKE = """
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
"""
ALLOW_OOM = "#!lua flags=allow-oom"  # script flags, Redis >= 7
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def file_lease_key(path: str) -> str:
    """Lease key of a file: a digest of its real path (any length, any characters)."""
    return "blissdata:writer:file:" + hashlib.sha1(str(path).encode()).hexdigest()


def take(client: redis.Redis, key: str, token: str, ttl_ms: int,
         allow_oom: bool = False) -> bool:
    """The lease if nobody holds it. `allow_oom`: the server takes script flags (Redis >= 7)
    and the lease is taken even at maxmemory."""
    script = ALLOW_OOM + _TAKE if allow_oom else _TAKE
    return client.eval(script, 1, key, token, ttl_ms) is not None


def release(client: redis.Redis, key: str, token: str) -> bool:
    return bool(client.eval(_RELEASE, 1, key, token))


def holder(client: redis.Redis, key: str) -> str | None:
    """Token of the lease's holder, None if free."""
    raw = client.get(key)
    return raw.decode() if raw else None


class FileLease:
    """This process's lease on one file and on the scans it writes into it (one token)."""

    def __init__(self, client: redis.Redis, path: str, token: str, ttl_s: float,
                 allow_oom: bool = False):
        self.client = client
        self.allow_oom = allow_oom
        self.path = str(path)
        self.key = file_lease_key(self.path)
        self.token = token
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.scans: set[str] = set()  # scan keys whose lease we hold with this token
        self.lost = False
        # lost because the keys were gone (Redis restarted without its data, or the lease
        # expired), not because another writer holds them
        self.vanished = False
        self._valid_until = 0.0  # time.monotonic() until which we surely hold it all
        self._lock = threading.Lock()

    def take(self) -> bool:
        started = time.monotonic()
        if not take(self.client, self.key, self.token, self.ttl_ms, self.allow_oom):
            return False
        self._valid_until = started + VALID_FRACTION * self.ttl_ms / 1000
        return True

    def take_scan(self, scan_key: str) -> "ScanLease | None":
        """The lease of a scan of this file, if nobody holds it."""
        if not take(self.client, keys.lease_key(scan_key), self.token, self.ttl_ms,
                    self.allow_oom):
            return None
        with self._lock:
            self.scans.add(scan_key)
        return ScanLease(self, scan_key)

    def release_scan(self, scan_key: str) -> None:
        with self._lock:
            self.scans.discard(scan_key)
        if not self.lost:
            release(self.client, keys.lease_key(scan_key), self.token)

    def release(self) -> None:
        """Give back the file's lease (its scans are released already)."""
        if not self.lost:
            release(self.client, self.key, self.token)
        self.lost = True

    def renew(self) -> bool:
        """Extend the file's lease and its scans'; False (and lost for good) if another writer
        holds one of them. Redis errors propagate: the lease stays valid until it expires."""
        with self._lock:
            if self.lost:
                return False
            started = time.monotonic()
            lease_keys = [self.key, *(keys.lease_key(s) for s in self.scans)]
            pipe = self.client.pipeline(transaction=False)
            for key in lease_keys:
                # EVAL as a raw command: redis-py's cluster pipelines refuse .eval(), not it
                pipe.execute_command("EVAL", _RENEW, 1, key, self.token, self.ttl_ms)
            renewed = pipe.execute()
            if all(renewed):
                self._valid_until = max(self._valid_until,
                                        started + VALID_FRACTION * self.ttl_ms / 1000)
            else:  # (a Redis error here changes nothing: the next renewal asks again)
                holders = self._holders([k for k, ok in zip(lease_keys, renewed) if not ok])
                self.lost = True
                self.vanished = not any(holders)
            return not self.lost

    def _holders(self, lease_keys: list) -> list:
        pipe = self.client.pipeline(transaction=False)
        for key in lease_keys:
            pipe.get(key)
        return pipe.execute()

    def holds(self) -> bool:
        """Whether this process may still write this file: surely yes until the local
        deadline; after it (paused, Redis slow), only once a renewal succeeds."""
        if self.lost:
            return False
        if time.monotonic() < self._valid_until:
            return True
        try:
            return self.renew() and time.monotonic() < self._valid_until
        except redis.RedisError:  # cannot tell: treat as lost, another may have it by now
            return False


class ScanLease:
    """Handed to a ScanWriter: ``check()`` before writing, ``fence`` for the Lua scripts."""

    def __init__(self, file_lease: FileLease, scan_key: str):
        self.file_lease = file_lease
        self.scan_key = scan_key
        self.key = keys.lease_key(scan_key)

    @property
    def token(self) -> str:
        return self.file_lease.token

    @property
    def fence(self) -> tuple[str, str]:
        """(lease key, token) for scripts that write only while the lease is ours."""
        return self.key, self.token

    def holds(self) -> bool:
        return self.file_lease.holds()

    def check(self) -> None:
        """LeaseLostError unless this writer still holds the scan and its file."""
        if not self.file_lease.holds():
            if self.file_lease.vanished:
                raise LeaseLostError(f"scan {self.scan_key}: this writer's lease on "
                                     f"{self.file_lease.path} is gone from Redis (Redis "
                                     f"restarted without its data, or the lease expired)")
            raise LeaseLostError(f"scan {self.scan_key}: this writer lost its lease on "
                                 f"{self.file_lease.path} (paused or cut off longer than "
                                 f"the lease); another writer takes the scan over")
