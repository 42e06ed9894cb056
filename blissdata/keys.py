"""Redis key layout of the blissdata protocol (see docs/protocol.md; keep both in sync).

Every key of one scan starts with the scan key, which carries a hash tag ``{<scan id>}``,
so a Redis Cluster keeps a whole scan on one node.
"""

PROTOCOL_VERSION = 1
PROTOCOL_KEY = "blissdata:protocol"
SCANS_STREAM = "blissdata:scans"  # one entry per created scan: {key, session}
INDEX_ALL = "blissdata:index:all"  # ZSET scan key -> creation time (s)


def session_index_key(session: str) -> str:
    return f"blissdata:index:session:{session}"


def scan_key(scan_id: str) -> str:
    return f"blissdata:scan:{{{scan_id}}}"


def state_key(key: str) -> str:
    return f"{key}:state"


def data_key(key: str, stream_name: str) -> str:
    return f"{key}:stream:{stream_name}"


def durable_key(key: str) -> str:
    return f"{key}:durable"


def lost_key(key: str) -> str:
    return f"{key}:lost"


def writer_key(key: str) -> str:
    return f"{key}:writer"


def lease_key(key: str) -> str:
    """The writer lease of a scan: the token of the writer process allowed to write it."""
    return f"{key}:lease"


def entry_id(first_index: int) -> str:
    """ID of the stream entry whose first point is `first_index` (seq is always 1)."""
    return f"{first_index}-1"


def first_index(entry_id: bytes | str) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])
