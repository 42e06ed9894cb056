"""Several writer processes on the same sessions: who writes what (docs/protocol.md,
"Writer pool").

- Every writer puts the scans it follows in one sorted set of unfinished scans
  (``blissdata:writer:unfinished``) and, every ``sweep`` (at most 1 s), tries to take those
  whose scan lease is free: first the lease of the scan's file (kept while it writes any scan
  of that file, so one file has one writer), then the scan's. A writer that stops renewing
  (killed, paused, cut off) loses them after ``lease_ttl_s``; the next sweep of another
  writer takes its scans over and resumes them from the file and the durable watermarks.
- Scans of blissdata 2.x are listed apart (``blissdata:writer:unfinished:bliss2``) and swept
  by the blissdata 2 follower (writer/protocols/blissdata2/), with the same leases.
- A registry of the writers alive: ``blissdata:writers`` (sorted set: writer id -> last
  heartbeat) and ``blissdata:writers:<id>`` (hash: host, pid, heartbeat, scans, files).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import redis

from blissdata import keys

from .lease import ALLOW_OOM, FileLease, ScanLease, holder

log = logging.getLogger("blisswriter")

UNFINISHED = "blissdata:writer:unfinished"  # ZSET scan key -> creation time
# the same for scans of blissdata 2.x (writer/protocols/blissdata2/): a list apart, so that writers
# following only native scans (older versions too) never meet a key they cannot read
UNFINISHED_BLISS2 = "blissdata:writer:unfinished:bliss2"
LISTINGS = (UNFINISHED, UNFINISHED_BLISS2)
WRITERS = "blissdata:writers"  # ZSET writer id -> last heartbeat (Unix s)
REGISTRY_KEEP_S = 3600  # a silent writer stays listed this long
_instances = 0
_OFFER = """
return redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
"""


def writer_key(writer_id: str) -> str:
    return f"{WRITERS}:{writer_id}"


def _new_writer_id() -> str:
    """host:pid; host:pid#n for the n-th pool of one process (tests run several)."""
    global _instances
    _instances += 1
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if _instances == 1 else f"{base}#{_instances}"


class WriterPool:
    """This process's share of the work: its leases, its heartbeat, the scans it may take."""

    def __init__(self, client: redis.Redis, ttl_s: float, sessions=(),
                 allow_oom: bool = False):
        """`allow_oom`: the server takes Lua script flags (Redis >= 7): scans are listed
        and leases taken even while Redis is full."""
        self.client = client
        self.allow_oom = allow_oom
        self.ttl_s = float(ttl_s)
        self.id = _new_writer_id()
        self.sessions = list(sessions)
        self.started = time.time()
        self.files: dict[str, FileLease] = {}  # path -> our lease on it
        self.scans: dict[str, ScanLease] = {}  # scan key -> our lease on it
        self.lost_count = 0  # leases lost to another writer (metrics)
        self.takeover_count = 0  # scans taken from a writer that stopped renewing
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._failing: set[str] = set()  # files whose last renewal failed (Redis unreachable)

    @property
    def sweep_s(self) -> float:
        return min(1.0, self.ttl_s / 4)

    # ---- taking and giving back --------------------------------------------------------
    def offer(self, scan_key: str, created: float | None = None,
              listing: str = UNFINISHED) -> None:
        """A scan some writer must write (idempotent)."""
        script = ALLOW_OOM + _OFFER if self.allow_oom else _OFFER
        self.client.eval(script, 1, listing, scan_key, created or time.time())

    def finished(self, scan_key: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for listing in LISTINGS:
            pipe.zrem(listing, scan_key)
        pipe.execute()

    def candidates(self, listing: str = UNFINISHED) -> list[str]:
        """Unfinished scans whose lease nobody holds, oldest first."""
        scan_keys = [k.decode() for k in self.client.zrange(listing, 0, -1)]
        if not scan_keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in scan_keys:
            pipe.exists(keys.lease_key(key))
        held = pipe.execute()
        return [k for k, h in zip(scan_keys, held) if not h and k not in self.scans]

    def acquire(self, scan_key: str, path: str) -> ScanLease | None:
        """The scan's lease and its file's (if not ours already); None if another writer
        holds either."""
        lease = self._acquire(scan_key, path)
        if lease is not None and len(lease.file_lease.scans) == 1:
            # a new file: in the registry before we open it, so that a writer taking it over
            # from us later knows to wait for our lock on it (wait_for_file)
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                log.debug("heartbeat not published: %s", exc)
        return lease

    def _acquire(self, scan_key: str, path: str) -> ScanLease | None:
        with self._lock:
            if scan_key in self.scans:
                return None
            file_lease = self.files.get(path)
            if file_lease is not None and not file_lease.holds():
                self._drop_file(file_lease)
                file_lease = None
            new_file = file_lease is None
            if new_file:
                file_lease = FileLease(self.client, path, f"{self.id}/{uuid.uuid4().hex[:8]}",
                                       self.ttl_s, self.allow_oom)
                if not file_lease.take():
                    return None
                self.files[path] = file_lease
            lease = file_lease.take_scan(scan_key)
            if lease is None:
                if new_file and not file_lease.scans:
                    self._drop_file(file_lease)
                return None
            self.scans[scan_key] = lease
            return lease

    def lease(self, scan_key: str) -> ScanLease:
        return self.scans[scan_key]

    def release(self, scan_key: str) -> None:
        """The scan's writer ended (done, failed, stopping or lost): its lease goes back, and
        the file's with the file's last scan."""
        with self._lock:
            lease = self.scans.pop(scan_key, None)
            if lease is None:
                return
            file_lease = lease.file_lease
            try:
                file_lease.release_scan(scan_key)
                if not file_lease.scans:
                    self._drop_file(file_lease)
            except redis.RedisError as exc:  # it expires by itself
                log.warning("scan %s: lease not released (%s); it expires in %.0f s",
                            scan_key, exc, self.ttl_s)
                if not file_lease.scans:
                    self.files.pop(file_lease.path, None)

    def _drop_file(self, file_lease: FileLease) -> None:
        if self.files.get(file_lease.path) is file_lease:
            del self.files[file_lease.path]
        file_lease.release()

    def holder_of(self, scan_key: str) -> str | None:
        return holder(self.client, keys.lease_key(scan_key))

    # ---- heartbeat -------------------------------------------------------------------
    def start(self) -> None:
        try:
            self.heartbeat()
        except redis.OutOfMemoryError:  # Redis full: the next one, once there is room
            pass
        self._keeper = threading.Thread(target=self._keep, name="leases", daemon=True)
        self._keeper.start()

    def _keep(self) -> None:
        """Renew every lease and the heartbeat every ttl / 5."""
        while not self._stop.wait(self.ttl_s / 5):
            with self._lock:
                file_leases = list(self.files.values())
            for file_lease in file_leases:
                try:
                    if not file_lease.renew() and file_lease.vanished:
                        log.warning("lease on %s is gone from Redis (Redis restarted without "
                                    "its data, or the lease expired): its scans %s stop here; "
                                    "those still in Redis are taken up again by the next "
                                    "sweep", file_lease.path, sorted(file_lease.scans))
                    elif file_lease.lost:
                        self.lost_count += 1
                        log.warning("lease on %s lost to another writer: its scans %s stop "
                                    "here", file_lease.path, sorted(file_lease.scans))
                    elif file_lease.path in self._failing:
                        self._failing.discard(file_lease.path)
                        log.warning("lease on %s renewed again", file_lease.path)
                except redis.RedisError as exc:  # said once, not at every try
                    level = logging.DEBUG if file_lease.path in self._failing else logging.WARNING
                    self._failing.add(file_lease.path)
                    log.log(level, "cannot renew the lease on %s: %s (it lapses %.1f s after "
                            "the last renewal)", file_lease.path, exc, self.ttl_s)
                except Exception:  # a bug: say it, keep renewing the others
                    log.exception("renewing the lease on %s", file_lease.path)
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                log.debug("heartbeat not published: %s", exc)

    def heartbeat(self) -> None:
        now = time.time()
        host, _, pid = self.id.partition(":")
        with self._lock:
            scans, files = sorted(self.scans), sorted(self.files)
        entry = {"id": self.id, "host": host, "pid": pid.split("#")[0],
                 "started": self.started, "heartbeat": now, "lease_ttl_s": self.ttl_s,
                 "sessions": json.dumps(self.sessions), "scans": json.dumps(scans),
                 "files": json.dumps(files)}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(writer_key(self.id), mapping=entry)
        pipe.expire(writer_key(self.id), REGISTRY_KEEP_S)
        pipe.zadd(WRITERS, {self.id: now})
        pipe.zremrangebyscore(WRITERS, 0, now - REGISTRY_KEEP_S)
        pipe.execute()

    def file_claimed_by_another(self, path: str) -> bool:
        """Whether another writer (alive or silent lately) said it writes that file."""
        return any(w["id"] != self.id and path in w["files"] for w in read_writers(self.client))

    def stop(self) -> None:
        """Stop renewing; leases still held go back at once (the scans' writers have paused:
        another writer may take them over without waiting for the leases to expire)."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(5)
        for scan_key in list(self.scans):
            self.release(scan_key)
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(writer_key(self.id))
            pipe.zrem(WRITERS, self.id)
            pipe.execute()
        except redis.RedisError:
            pass


def read_writers(client: redis.Redis) -> list[dict]:
    """The writers of the registry, most recent heartbeat first: id, host, pid, heartbeat,
    alive (heartbeat within its lease ttl), scans, files."""
    ids = [i.decode() for i in client.zrevrange(WRITERS, 0, -1)]
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for writer_id in ids:
        pipe.hgetall(writer_key(writer_id))
    now = time.time()
    found = []
    for raw in pipe.execute():
        if not raw:
            continue
        entry = {k.decode(): v.decode() for k, v in raw.items()}
        heartbeat = float(entry.get("heartbeat", 0))
        ttl = float(entry.get("lease_ttl_s", 5))
        found.append({"id": entry.get("id", ""), "host": entry.get("host", ""),
                      "pid": int(entry.get("pid", 0) or 0), "heartbeat": heartbeat,
                      "alive": now - heartbeat < ttl, "lease_ttl_s": ttl,
                      "scans": json.loads(entry.get("scans", "[]")),
                      "files": json.loads(entry.get("files", "[]"))})
    return found


def scan_holders(client: redis.Redis, scan_keys: list) -> dict:
    """scan key -> id of the writer holding its lease (scans nobody holds are left out)."""
    if not scan_keys:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in scan_keys:
        pipe.get(keys.lease_key(key))
    return {key: token.decode().split("/")[0]
            for key, token in zip(scan_keys, pipe.execute()) if token}


def wait_for_file(acquire, lease: ScanLease, patience_s: float, stop: threading.Event,
                  on_wait=None):
    """``acquire()`` (open a file for writing) for a scan taken over from another writer:
    while that one (paused, or not yet noticed it lost its lease) still has the file locked,
    wait, keeping our lease, for up to ``patience_s``; it lets go before its next write."""
    from ..hdf5.locks import FileLockedError

    deadline = time.monotonic() + patience_s
    told = False
    while True:
        try:
            return acquire()
        except FileLockedError:
            if time.monotonic() > deadline or stop.is_set():
                raise
            if not told and on_wait is not None:
                on_wait()
                told = True
            lease.check()
            time.sleep(0.1)
