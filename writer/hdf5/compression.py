"""Compression settings of streamed datasets -> h5py ``create_dataset`` keyword arguments.

A setting is given in the writer's configuration either as a name or as a dict::

    "bitshuffle-lz4"                       # the default (alias "bslz4"); no level
    {"name": "zstd", "level": 3}           # level 1..22, default 3
    {"name": "blosc2", "level": 5}         # Blosc2, cname lz4 + bitshuffle; level 0..9, default 5
    {"name": "gzip", "level": 1}           # deflate + shuffle; level 0..9, default 1
    "none"                                 # no filter (None means the default, not "none")

Unknown names, unknown keys and bad levels raise ValueError naming the setting and the
allowed values. :func:`is_bslz4` tells whether frames already compressed in the bslz4 chunk
format (:mod:`blissdata.bslz4`) can be stored as they are (``write_direct_chunk``).
"""

from __future__ import annotations

from dataclasses import dataclass

import hdf5plugin

__all__ = ["CompressionSetting", "parse_compression", "compression_kwargs", "is_bslz4",
           "dataset_is_bslz4", "DEFAULT", "NAMES", "ACCEPTED_NAMES"]

DEFAULT = "bitshuffle-lz4"
_ALIASES = {"bslz4": "bitshuffle-lz4", "bitshuffle_lz4": "bitshuffle-lz4"}
#: name -> (lowest level, highest level, default level), or None when there is no level
_LEVELS = {
    "bitshuffle-lz4": None,
    "zstd": (1, 22, 3),
    "blosc2": (0, 9, 5),
    "gzip": (0, 9, 1),
    "none": None,
}
NAMES = tuple(_LEVELS)
#: every name a setting may give (the aliases too), for help texts and errors
ACCEPTED_NAMES = NAMES + tuple(_ALIASES)

BITSHUFFLE_FILTER_ID = 32008
_BSHUF_LZ4 = 2  # bitshuffle filter's cd_values[4] for LZ4


@dataclass(frozen=True)
class CompressionSetting:
    """A validated compression setting: ``name`` one of :data:`NAMES`, ``level`` or None."""

    name: str = DEFAULT
    level: int | None = None

    @property
    def is_bslz4(self) -> bool:
        return self.name == "bitshuffle-lz4"

    def h5py_kwargs(self) -> dict:
        """Keyword arguments for ``h5py.Group.create_dataset``."""
        if self.name == "bitshuffle-lz4":
            return dict(hdf5plugin.Bitshuffle(nelems=0, cname="lz4"))
        if self.name == "zstd":
            return dict(hdf5plugin.Zstd(clevel=self.level))
        if self.name == "blosc2":
            return dict(hdf5plugin.Blosc2(cname="lz4", clevel=self.level,
                                          filters=hdf5plugin.Blosc2.BITSHUFFLE))
        if self.name == "gzip":
            return {"compression": "gzip", "compression_opts": self.level, "shuffle": True}
        return {}

    def to_json(self):
        return self.name if self.level is None else {"name": self.name, "level": self.level}


def parse_compression(setting=None) -> CompressionSetting:
    """Validate a setting (None, a name, a dict, or a CompressionSetting)."""
    if setting is None:
        return CompressionSetting(DEFAULT)
    if isinstance(setting, CompressionSetting):
        return setting
    if isinstance(setting, str):
        name, level, rest = setting, None, {}
    elif isinstance(setting, dict):
        rest = dict(setting)
        if "name" not in rest:
            raise ValueError(f"compression setting {setting!r}: needs a 'name', one of "
                             f"{ACCEPTED_NAMES}")
        name = rest.pop("name")
        level = rest.pop("level", None)
        if rest:
            raise ValueError(f"compression setting {setting!r}: unknown keys {sorted(rest)}; "
                             "allowed keys are 'name' and 'level'")
    else:
        raise ValueError(f"compression setting {setting!r}: must be a name (one of "
                         f"{ACCEPTED_NAMES}) "
                         "or a dict {'name': ..., 'level': ...}")
    key = _ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name
    if key not in _LEVELS:
        raise ValueError(f"compression setting {setting!r}: unknown name {name!r}; allowed "
                         f"names are {ACCEPTED_NAMES}")
    levels = _LEVELS[key]
    if levels is None:
        if level is not None:
            raise ValueError(f"compression setting {setting!r}: {key!r} takes no level")
        return CompressionSetting(key, None)
    lo, hi, default = levels
    if level is None:
        level = default
    if isinstance(level, bool) or not isinstance(level, int) or not lo <= level <= hi:
        raise ValueError(f"compression setting {setting!r}: level {level!r} for {key!r} must "
                         f"be an integer from {lo} to {hi}")
    return CompressionSetting(key, level)


def compression_kwargs(setting=None) -> dict:
    """h5py ``create_dataset`` keyword arguments for a setting (see the module docstring)."""
    return parse_compression(setting).h5py_kwargs()


def is_bslz4(setting=None) -> bool:
    """True if the setting stores chunks in the bslz4 format (bitshuffle + LZ4, default
    block size), so precompressed bslz4 frames can be written with ``write_direct_chunk``."""
    return parse_compression(setting).is_bslz4


def dataset_is_bslz4(dataset) -> bool:
    """True if an existing h5py dataset's only filter is bitshuffle with LZ4 (whatever its
    block size: the decoder reads the block size from each chunk's header)."""
    plist = dataset.id.get_create_plist()
    if plist.get_nfilters() != 1:
        return False
    fid, _flags, values, _name = plist.get_filter(0)
    if fid != BITSHUFFLE_FILTER_ID:
        return False
    # user values are (block size, compression); the library prepends version + itemsize
    if len(values) >= 5:
        return values[4] == _BSHUF_LZ4
    return len(values) >= 2 and values[1] == _BSHUF_LZ4
