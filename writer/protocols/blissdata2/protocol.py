"""What blissdata 2.4.5 keeps in Redis: its constants, the modules it needs, and the
little msgpack it uses; Bliss2Error, the failure of a scan this writer cannot write."""

from __future__ import annotations

import struct

import redis

from ...scan.errors import ScanFailed


BLISSDATA_VERSION = "2.4.5"  # the version this module was read from
PROTOCOL_KEY = "_PROTOCOL_VERSION_"
PROTOCOL_VERSION = 1
SCAN_HISTORY = "_SCAN_HISTORY_"
SEAL_ID = 2**64 - 1
SEAL_ENTRY = f"{SEAL_ID}-{SEAL_ID}"
SEAL_BYTES = SEAL_ENTRY.encode()
DELETED_TTL_S = 10  # blissdata deletes a scan by giving its keys a TTL of 10 s
DURABLE_TTL_S = 7 * 24 * 3600


class Bliss2Error(ScanFailed):
    """This blissdata 2 scan cannot be written as published; the message says why."""


def durable_key(scan_key: str) -> str:
    """This writer's watermarks (its own key: blissdata 2 has none for them)."""
    return f"blisswriter:bliss2:{scan_key}:durable"


def is_bliss2_redis(client: redis.Redis) -> bool:
    return client.get(PROTOCOL_KEY) is not None


class ModulesMissing(RuntimeError):
    """The Redis server lacks a module blissdata 2 needs: no blissdata 2 scan can come."""


# module -> a command of it that answers without a key or an index to exist
NEEDED_MODULES = {"RedisJSON": ("JSON.GET", "blisswriter:module-check"),
                  "RediSearch": ("FT._LIST",)}


def check_modules(client: redis.Redis, url_shown: str) -> None:
    """ModulesMissing naming each module blissdata 2 needs (RedisJSON: its scans are JSON
    documents; RediSearch: its producers index them) that the server at `url_shown` has not
    loaded or does not let this client use. Each is tried by a command of its own: Redis
    Stack and Valkey name their modules differently in MODULE LIST."""
    problems = []
    for module, command in NEEDED_MODULES.items():
        try:
            client.execute_command(*command)
        except redis.ResponseError as exc:
            problems.append(f"{module} ({command[0]}: {exc})")
    if problems:
        raise ModulesMissing(
            f"Redis at {url_shown} cannot serve blissdata 2 scans: missing "
            f"{', '.join(problems)}. Run the Redis that BLISS uses (redis-stack-server, or "
            f"valkey-server --loadmodule for valkey-json and valkey-search), or leave "
            f"blissdata2 out of --protocol (config: protocols)")


# ---- msgpack, the little that blissdata 2 uses: [shape list, bytes] ---------------------
def unpack_msgpack(buf: bytes, pos: int = 0):
    """Decode one msgpack value at `pos`: (value, next pos). Arrays, ints, bin, str."""
    b = buf[pos]
    if b <= 0x7F:
        return b, pos + 1
    if b >= 0xE0:
        return b - 0x100, pos + 1
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        if b <= 0x9F:
            n, pos = b & 0x0F, pos + 1
        else:
            size = 2 if b == 0xDC else 4
            n, pos = int.from_bytes(buf[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        items = []
        for _ in range(n):
            item, pos = unpack_msgpack(buf, pos)
            items.append(item)
        return items, pos
    ints = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if b in ints:
        fmt = ints[b]
        return struct.unpack_from(fmt, buf, pos + 1)[0], pos + 1 + struct.calcsize(fmt)
    lengths = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
    if b in lengths or 0xA0 <= b <= 0xBF:
        if 0xA0 <= b <= 0xBF:
            n, pos = b & 0x1F, pos + 1
        else:
            size = lengths[b]
            n, pos = int.from_bytes(buf[pos + 1:pos + 1 + size], "big"), pos + 1 + size
        raw = buf[pos:pos + n]
        return (raw.decode() if b not in (0xC4, 0xC5, 0xC6) else raw), pos + n
    raise ValueError(f"msgpack byte 0x{b:02x} is not one blissdata {BLISSDATA_VERSION} writes")
