"""DataStore: the entry point. Connects to Redis, creates, finds, follows and deletes scans."""

from __future__ import annotations

import json
import os
import time
import uuid

import redis
import redis.cluster
from redis.connection import (HIREDIS_AVAILABLE, Encoder, HiredisRespSerializer,
                              PythonRespSerializer)

from . import keys
from .file_backing import FileCache
from .mapping import json_compatible
from .redis_url import masked
from .exceptions import (NoScanAvailable, ProtocolVersionError, RedisFullError,
                         RedisUnreachableError, ScanNotFoundError, ScanStateError)
from .scan import Scan, ScanState
from .waiting import Deadline, call_retrying, longest_block_s, wait_for

DEFAULT_MAX_EVENT_BYTES = 64 * 2**20
LOCAL_URL = "redis://127.0.0.1:6379"
_BUFFER_CUTOFF = 6000  # redis-py's: larger arguments are sent as they are, not joined


def url_from(given: str | None) -> str:
    """The Redis URL a command-line tool uses: the one given, else $REDIS_URL, else local."""
    return given or os.environ.get("REDIS_URL") or LOCAL_URL


_IDENTITY_FIELDS = ("session", "name", "number", "path")


class _Packer:
    """Commands with large arguments (frames) go to the socket straight from the caller's
    buffer; redis-py's hiredis packer would copy each argument twice (bench: 16 frames per
    call 1.27 -> 1.74 GB/s). Commands of small arguments are packed by hiredis, in C."""

    def __init__(self, encoding: str, errors: str):
        encode = Encoder(encoding, errors, False).encode
        self._python = PythonRespSerializer(_BUFFER_CUTOFF, encode)
        self._hiredis = HiredisRespSerializer() if HIREDIS_AVAILABLE else self._python

    def pack(self, *args):
        for arg in args:  # called for every command: no allocation per argument
            if isinstance(arg, memoryview):
                if arg.nbytes > _BUFFER_CUTOFF:
                    return self._python.pack(*args)
            elif isinstance(arg, (bytes, bytearray)) and len(arg) > _BUFFER_CUTOFF:
                return self._python.pack(*args)
        return self._hiredis.pack(*args)


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def is_cluster(client) -> bool:
    return isinstance(client, redis.cluster.RedisCluster)


def client_from_url(url: str, **kwargs) -> redis.Redis:
    """A redis-py client for `url`, not checked: a RedisCluster for ``redis+cluster://``
    (``rediss+cluster://``) URLs, which asks the node for the others at once."""
    if url.startswith(CLUSTER_SCHEMES):
        return redis.cluster.RedisCluster.from_url(url.replace("+cluster", "", 1), **kwargs)
    kwargs.setdefault("command_packer", _Packer(kwargs.get("encoding", "utf-8"),
                                                kwargs.get("encoding_errors", "strict")))
    return redis.Redis.from_url(url, **kwargs)


def connect(url: str, **kwargs) -> redis.Redis:
    """A redis-py client for `url`; if Redis is down, a RedisUnreachableError (also a
    builtin ConnectionError) that names the URL, its password masked.

    ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) gives a RedisCluster
    that finds the other nodes from that one; every other URL a Redis client."""
    try:
        client = client_from_url(url, **kwargs)
        client.ping()
    except redis.AuthenticationError as exc:
        raise ConnectionError(f"Redis at {masked(url)}: authentication failed: {exc}") \
            from None
    except (redis.ConnectionError, redis.TimeoutError, redis.RedisClusterException,
            OSError) as exc:
        raise RedisUnreachableError(f"cannot reach Redis at {masked(url)}: {masked(exc)}") \
            from None
    except ValueError as exc:
        raise ValueError(f"not a Redis URL: {masked(url)!r} ({masked(exc)})") from None
    return client


class DataStore:
    """``DataStore("redis://host:6379")``; also ``rediss://``, ``unix:///path.sock``,
    ``redis+cluster://host:port`` (a Redis/Valkey Cluster, any node),
    ``redis://user:password@host``.

    `max_event_bytes` bounds one Redis entry: batches are split below it and a single point
    above it is refused. `full_timeout_s`: how long `send()`, `seal()` and state changes
    wait, retrying, while Redis is full (maxmemory) before they raise RedisFullError.
    `reconnect_timeout_s`: how long a blocking wait (`get_next_scan`, `Scan.update`,
    `cursor.read`) keeps reconnecting, with backoff, after losing Redis before it raises
    RedisUnreachableError (None: for ever). Waits of any length work whatever the socket
    timeout (`socket_timeout`, redis-py's default 5 s): see blissdata/waiting.py.
    `wait_for_redis`: a Redis unreachable at creation is waited for as a lost one is (same
    backoff and log lines, up to `reconnect_timeout_s`), not a ConnectionError at once: a
    service need not start after Redis. `masked_url`: the URL with its password masked, for
    messages.
    """

    def __init__(self, url: str, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 full_timeout_s: float = 60.0, reconnect_timeout_s: float | None = 60.0,
                 wait_for_redis: bool = False, **redis_kwargs):
        self.url = url
        self.masked_url = masked(url)  # for messages: the password never shown
        self.max_event_bytes = int(max_event_bytes)
        self.full_timeout_s = float(full_timeout_s)
        if reconnect_timeout_s is not None and not reconnect_timeout_s >= 0:
            raise ValueError(f"reconnect_timeout_s must be a number of seconds >= 0 or None "
                             f"(for ever), got {reconnect_timeout_s!r}")
        self.reconnect_timeout_s = reconnect_timeout_s
        if wait_for_redis:
            self._redis = call_retrying(self, lambda: connect(url, **redis_kwargs),
                                        Deadline(None), "connecting")
        else:
            self._redis = connect(url, **redis_kwargs)
        self.longest_block_s = longest_block_s(self._redis)  # one blocking call, at most
        self._files = FileCache()  # files holding points trimmed from Redis
        self._script_flags = None  # known once asked (script_flags())
        self._check_protocol()

    def _check_protocol(self) -> None:
        # read first: a client (a restarted memory tracker, say) must be able to start while
        # Redis is full, when writes are refused
        found = self._redis.get(keys.PROTOCOL_KEY)
        if found is None:
            self._redis.set(keys.PROTOCOL_KEY, keys.PROTOCOL_VERSION, nx=True)
            found = self._redis.get(keys.PROTOCOL_KEY)
        if int(found) != keys.PROTOCOL_VERSION:
            raise ProtocolVersionError(
                f"Redis at {self.masked_url} holds blissdata protocol version "
                f"{found.decode()}, this library speaks version {keys.PROTOCOL_VERSION}")

    def used_memory(self) -> int:
        """Bytes Redis uses (INFO used_memory); on a cluster, the fullest primary's (each
        node has its own maxmemory)."""
        if is_cluster(self._redis):
            found = self._redis.info("memory", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
            return max(int(info["used_memory"]) for info in found.values())
        return int(self._redis.info("memory")["used_memory"])

    def script_flags(self) -> bool:
        """Whether the server takes Lua script flags (``#!lua flags=...``, Redis >= 7)."""
        if self._script_flags is None:
            version = self._redis.info("server").get("redis_version", "0")
            self._script_flags = int(str(version).split(".")[0]) >= 7
        return self._script_flags

    def while_full(self, write, what: str):
        """``write()``, retried while Redis is full (maxmemory: the memory tracker waits for
        the writer's watermark) for up to ``full_timeout_s``; then RedisFullError naming
        ``what``. The producer slows down; nothing is lost or written twice."""
        deadline = time.monotonic() + self.full_timeout_s
        delay = 0.01
        while True:
            try:
                return write()
            except redis.OutOfMemoryError as exc:
                if time.monotonic() > deadline:
                    raise RedisFullError(f"Redis at {self.masked_url} stayed full (maxmemory) "
                                         f"for {self.full_timeout_s} s; {what}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    @property
    def redis(self) -> redis.Redis:
        """The underlying redis-py client (for tools; the protocol is in docs/protocol.md)."""
        return self._redis

    @property
    def files(self) -> FileCache:
        """The data files this store reads trimmed points from: each open only during the
        read that needs it (see `blissdata.file_backing.FileCache`)."""
        return self._files

    def close(self) -> None:
        self._files.close()
        self._redis.close()

    # ---- producer ----------------------------------------------------------------------
    def create_scan(self, identity: dict, info: dict | None = None) -> Scan:
        """A new scan in state CREATED. `identity`: session, name, number, path."""
        missing = [f for f in _IDENTITY_FIELDS if f not in identity]
        if missing:
            raise ValueError(f"scan identity misses {missing} (needs {list(_IDENTITY_FIELDS)})")
        if not isinstance(identity["number"], int) or identity["number"] < 0:
            raise ValueError(f"scan identity: number must be an integer >= 0, "
                             f"got {identity['number']!r}")
        for f in ("session", "name", "path"):
            if not isinstance(identity[f], str) or not identity[f]:
                raise ValueError(f"scan identity: {f} must be a non-empty string, "
                                 f"got {identity[f]!r}")
        key = keys.scan_key(uuid.uuid4().hex)
        # tuples and numpy values become JSON here as in prepare(); a set is refused by path
        info = json_compatible(info or {}, where=f"scan {key}: info $")
        now = time.time()
        fields = {"identity": json.dumps(identity), "info": json.dumps(info),
                  "state": ScanState.CREATED.name, "streams": "{}", "created": now}
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.xadd(keys.state_key(key), {"state": ScanState.CREATED.name})
        pipe.zadd(keys.INDEX_ALL, {key: now})
        pipe.zadd(keys.session_index_key(identity["session"]), {key: now})
        pipe.xadd(keys.SCANS_STREAM, {"key": key, "session": identity["session"]})
        pipe.execute()
        scan = Scan(self, key, {k.encode(): str(v).encode() for k, v in fields.items()})
        scan.info = dict(info)
        return scan

    # ---- readers -----------------------------------------------------------------------
    def load_scan(self, key: str) -> Scan:
        """The scan under `key`; ScanNotFoundError if there is none."""
        if isinstance(key, bytes):
            key = key.decode()
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.xrevrange(keys.state_key(key), "+", "-", count=1)
        fields, last_state = pipe.execute()
        if not fields or b"identity" not in fields:
            raise ScanNotFoundError(f"no scan {key!r} in Redis at {self.masked_url}")
        return Scan(self, key, fields, state_id=last_state[0][0] if last_state else "0-0")

    def get_next_scan(self, since: str | None = None, block: bool = True,
                      timeout: float | None = None, session: str | None = None):
        """Wait for a scan created after `since` -> (since, key).

        Pass the returned `since` to the next call to miss no scan between calls.
        `since=None` means "from now"; `since="0-0"` replays every scan still listed.
        NoScanAvailable when `timeout` (seconds; None: wait for ever) passes, or at once if
        not `block`. A lost connection is retried (RedisUnreachableError if it stays lost).
        """
        if not block:
            found = self._next_scan_after(since, None, session)
            while found is not None and found[1] is None:  # other sessions' scans only
                found = self._next_scan_after(found[0], None, session)
            if found is None:
                raise NoScanAvailable(f"no new scan{self._in(session)}")
            return found
        deadline = Deadline(timeout)
        if since is None:
            since = call_retrying(self, lambda: self._scans_end(), deadline,
                                  "waiting for a new scan")
        position = [since]  # advanced past scans of other sessions between calls

        def poll(block_ms: int):
            found = self._next_scan_after(position[0], block_ms, session)
            if found is not None and found[1] is None:  # only other sessions' scans
                position[0] = found[0]
                return None
            return found

        found = wait_for(self, poll, deadline, f"waiting for a new scan{self._in(session)}")
        if found is None:
            raise NoScanAvailable(f"no new scan{self._in(session)} within {timeout} s")
        return found

    def _scans_end(self) -> str:
        last = self._redis.xrevrange(keys.SCANS_STREAM, "+", "-", count=1)
        return last[0][0].decode() if last else "0-0"

    def _next_scan_after(self, since: str | None, block_ms: int | None, session):
        """One XREAD of the scans stream: (since, key) of the first scan of `session`;
        (since, None) if only other sessions' scans came; None if none came."""
        if since is None:
            since = self._scans_end()
        reply = self._redis.xread({keys.SCANS_STREAM: since}, block=block_ms, count=100)
        if not reply:
            return None
        for eid, fields in reply[0][1]:
            since = eid.decode()
            if session is None or fields[b"session"].decode() == session:
                return since, fields[b"key"].decode()
        return since, None

    @staticmethod
    def _in(session):
        return f" in session {session!r}" if session else ""

    def get_last_scan(self, session: str | None = None) -> str:
        """Key of the most recently created scan (of `session`)."""
        index = keys.session_index_key(session) if session else keys.INDEX_ALL
        got = self._redis.zrevrange(index, 0, 0)
        if not got:
            raise NoScanAvailable(f"no scan{self._in(session)}")
        return got[0].decode()

    def search_scans(self, session: str | None = None, name: str | None = None,
                     number: int | None = None) -> list[str]:
        """Keys of the scans matching every given field, oldest first."""
        index = keys.session_index_key(session) if session else keys.INDEX_ALL
        scan_keys = [k.decode() for k in self._redis.zrange(index, 0, -1)]
        if name is None and number is None:
            return scan_keys
        pipe = self._redis.pipeline(transaction=False)
        for key in scan_keys:
            pipe.hget(key, "identity")
        found = []
        for key, raw in zip(scan_keys, pipe.execute()):
            if raw is None:
                continue
            identity = json.loads(raw)
            if name is not None and identity["name"] != name:
                continue
            if number is not None and identity["number"] != number:
                continue
            found.append(key)
        return found

    def delete_scan(self, key: str) -> None:
        """Close the scan (end_reason DELETION) if it is still open, then remove its keys."""
        scan = self.load_scan(key)
        if scan.state != ScanState.CLOSED:
            try:
                scan.close_deleted()
            except ScanStateError:
                pass  # closed meanwhile by its producer
        doomed = [key, keys.state_key(key), keys.durable_key(key), keys.lost_key(key),
                  keys.writer_key(key)] + [s.key for s in scan.streams.values()]
        pipe = self._redis.pipeline(transaction=False)
        for doomed_key in doomed:  # one by one: a cluster pipeline deletes one key a command
            pipe.delete(doomed_key)
        pipe.zrem(keys.INDEX_ALL, key)
        pipe.zrem(keys.session_index_key(scan.session), key)
        pipe.execute()
