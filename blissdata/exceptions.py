"""Errors users of blissdata can catch. Each message says what was wrong and where."""

import redis


class BlissdataError(Exception):
    """Base class of every blissdata error."""


class ScanNotFoundError(BlissdataError, KeyError):
    """No scan under that key (never created, deleted or expired)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NoScanAvailable(BlissdataError):
    """get_next_scan()/get_last_scan() found no scan (timeout or empty session)."""


class ScanStateError(BlissdataError):
    """A state transition out of order (e.g. start() before prepare())."""


class StreamError(BlissdataError):
    """Misuse of a stream (unknown stream, send after seal, second seal...)."""


class MalformedEntryError(StreamError, ValueError):
    """A stream entry whose fields do not fit the stream's definition (written by a buggy
    producer or another protocol version); the message names the stream, the points and
    what did not fit."""


class StreamSealedError(StreamError):
    """The stream is sealed: nothing can be sent to it any more."""


class SchemaError(BlissdataError, ValueError):
    """scan.info (or a mapping) does not validate; the message names the JSON path."""


class ProtocolVersionError(BlissdataError):
    """The Redis database speaks another blissdata protocol version."""


class EventTooLargeError(BlissdataError, ValueError):
    """One point is larger than the configured event size limit."""


class IndexNotYetThereError(BlissdataError, IndexError):
    """The index is not published yet (the stream is still open)."""


class IndexNoMoreThereError(BlissdataError, IndexError):
    """The index was trimmed from Redis and no file holds it."""


class PointsGoneError(IndexNoMoreThereError):
    """Points [start, stop) of a stream are neither in Redis nor readable from a file (lost,
    or not in the file yet): ``stream``, ``start``, ``stop`` say which."""

    def __init__(self, message: str, stream: str, start: int, stop: int):
        super().__init__(message)
        self.stream, self.start, self.stop = stream, start, stop


class IndexWontBeThereError(BlissdataError, IndexError):
    """The stream was sealed before reaching that index."""


class EndOfStream(BlissdataError):
    """A cursor reached the end of a sealed stream."""


class RedisFullError(BlissdataError):
    """Redis stayed at maxmemory longer than the store's full_timeout_s; nothing was written."""


class RedisUnreachableError(BlissdataError, redis.ConnectionError, ConnectionError):
    """Redis cannot be reached: at connection (`DataStore(url)`), or a wait lost its Redis
    connection and could not get it back: Redis stayed unreachable for the store's
    `reconnect_timeout_s`, or until the wait's own timeout passed. Also a
    `redis.ConnectionError` and a builtin `ConnectionError`, for code that catches those."""


class LeaseLostError(BlissdataError):
    """A writer no longer holds the lease of a scan (another writer took it over): it must
    not write that scan or its file again (fencing)."""
