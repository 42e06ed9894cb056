"""The HDF5 superblock's status flags ("open for writing", "for SWMR writing"), read and
changed in place with their checksum: how a writer marks a file it writes, and how a file
left marked by a writer killed -9 is repaired (:func:`clear_write_flags`)."""

from __future__ import annotations

import os



_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle``, the checksum of HDF5's metadata
    (``H5_checksum_lookup3``)."""
    m = 0xFFFFFFFF
    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & m
    k = 0
    while length > 12:
        a = (a + int.from_bytes(data[k:k + 4], "little")) & m
        b = (b + int.from_bytes(data[k + 4:k + 8], "little")) & m
        c = (c + int.from_bytes(data[k + 8:k + 12], "little")) & m
        a = (a - c) & m; a ^= _rot(c, 4); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 6); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 8); b = (b + a) & m  # noqa: E702
        a = (a - c) & m; a ^= _rot(c, 16); c = (c + b) & m  # noqa: E702
        b = (b - a) & m; b ^= _rot(a, 19); a = (a + c) & m  # noqa: E702
        c = (c - b) & m; c ^= _rot(b, 4); b = (b + a) & m  # noqa: E702
        length -= 12
        k += 12
    if length == 0:
        return c
    tail = data[k:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & m
    b = (b + int.from_bytes(tail[4:8], "little")) & m
    c = (c + int.from_bytes(tail[8:12], "little")) & m
    c ^= b; c = (c - _rot(b, 14)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 11)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 25)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 16)) & m  # noqa: E702
    a ^= c; a = (a - _rot(c, 4)) & m  # noqa: E702
    b ^= a; b = (b - _rot(a, 14)) & m  # noqa: E702
    c ^= b; c = (c - _rot(b, 24)) & m  # noqa: E702
    return c


#: the superblock's status flags (HDF5's H5F_SUPER_WRITE_ACCESS | H5F_SUPER_SWMR_WRITE_ACCESS)
WRITE_FLAGS = 0x01
SWMR_WRITING_FLAGS = 0x05


def clear_write_flags(path) -> bool:
    """What ``h5clear -s`` does: mark a file as no longer open for writing. A writer killed
    while it had the file open (SWMR or not) leaves these flags set, and HDF5 then refuses
    to open the file except read-only with ``swmr=True``.

    The flags are byte 11 of a version 2 or 3 superblock (at offset 0, or 512, 1024, ... after
    a user block), covered by the superblock's lookup3 checksum. True if flags were cleared,
    False if there were none; ValueError if the file has no such superblock. Only for a file
    no program has open for writing (the writer checks its own lock first)."""
    return set_status_flags(path, 0) != 0


def set_status_flags(path, flags: int) -> int:
    """Write the superblock's status flags (0: closed; :data:`SWMR_WRITING_FLAGS`: "being
    written in SWMR mode") and return the ones it had. ValueError if the file has no version
    2 or 3 superblock or its checksum is wrong (nothing is written then)."""
    with open(path, "r+b") as fh:
        offset = _superblock_offset(fh)
        if offset is None:
            raise ValueError(f"{path}: no HDF5 superblock found")
        fh.seek(offset)
        head = fh.read(48)
        version, size_offsets = head[8], head[9]
        if version not in (2, 3):
            raise ValueError(f"{path}: superblock version {version} has no consistency "
                             "flags (only versions 2 and 3, libver 'latest')")
        end = 12 + 4 * size_offsets  # flags, then 4 addresses, then the checksum
        fh.seek(offset)
        block = bytearray(fh.read(end + 4))
        if lookup3(bytes(block[:end])) != int.from_bytes(block[end:end + 4], "little"):
            raise ValueError(f"{path}: the superblock's checksum is wrong; not touched")
        before = block[11]
        if before == flags:
            return before
        block[11] = flags
        block[end:end + 4] = lookup3(bytes(block[:end])).to_bytes(4, "little")
        fh.seek(offset)
        fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    return before


def status_flags(path) -> int | None:
    """The superblock's status flags of the file at `path`: non-zero while a program has it
    open for writing (or one killed while it had), 0 once closed; None for a file without
    such flags (superblock version 0 or 1, not HDF5, missing)."""
    try:
        with open(path, "rb") as fh:
            offset = _superblock_offset(fh)
            if offset is None:
                return None
            fh.seek(offset + 8)
            head = fh.read(4)
    except OSError:
        return None
    return head[3] if len(head) == 4 and head[0] in (2, 3) else None


def swmr_capable(path) -> bool:
    """Whether the file at `path` can be written in SWMR mode: it does not exist yet (the
    writer makes it so), or it has a version 3 superblock (``libver="latest"``). A file an
    older version made without SWMR (version 0) is written on as it was."""
    try:
        with open(path, "rb") as fh:
            offset = _superblock_offset(fh)
            if offset is None:
                return False
            fh.seek(offset + 8)
            return fh.read(1)[0] >= 3  # the superblock's version
    except FileNotFoundError:
        return True


def _superblock_offset(fh) -> int | None:
    """Where the HDF5 superblock of the open file `fh` starts (0, or 512, 1024, ... after a
    user block), or None if it has none."""
    offset = 0
    while True:
        fh.seek(offset)
        head = fh.read(9)
        if len(head) < 9:
            return None
        if head[:8] == _SIGNATURE:
            return offset
        offset = 512 if offset == 0 else offset * 2
