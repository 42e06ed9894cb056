"""How a static value of a scan (a mapping's RAW leaf, an attribute: JSON values) is stored
in HDF5, and so how h5py reads it back. The writer stores values with these functions, and
`blissdata.h5api` shows a live scan's values through them, so that a script gets the same
types live and archived (``bytes`` for text, with ``.asstr()``; the same dtypes and shapes).
"""

from __future__ import annotations

import functools
import json

import h5py
import numpy as np

TEXT = h5py.string_dtype("utf-8")


def storable(value):
    """A JSON value -> something h5py stores well (UTF-8 text, numeric arrays)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        flat = value
        while flat and isinstance(flat, list) and isinstance(flat[0], list):
            flat = flat[0]
        try:
            if flat and isinstance(flat[0], str):
                return np.array(value, dtype=TEXT)
            arr = np.asarray(value)
            if arr.dtype.kind in "biuf":
                return arr
        except ValueError:  # ragged nested lists
            pass
        return json.dumps(value)
    return value


# h5py's low-level API: a skeleton of 10,000 nodes is written ~2x faster than through
# Group.create_dataset/.attrs (0.5 s instead of 2.3 s here).
_COMPACT_MAX = 16 * 1024
_TEXT_TYPE = h5py.h5t.py_create(TEXT, logical=True)
_SCALAR_SPACE = h5py.h5s.create(h5py.h5s.SCALAR)


@functools.lru_cache(maxsize=64)
def _file_type(dtype: np.dtype):
    return h5py.h5t.py_create(dtype, logical=True)


@functools.lru_cache(maxsize=2)
def _dcpl(compact: bool):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_obj_track_times(False)
    if compact:
        dcpl.set_layout(h5py.h5d.COMPACT)
    return dcpl


def _array_and_type(value):
    value = storable(value)
    if isinstance(value, str):
        return np.array(value, dtype=TEXT), _TEXT_TYPE
    arr = np.asarray(value)
    if arr.dtype.kind == "O":
        return arr, _TEXT_TYPE
    return arr, _file_type(arr.dtype)


def _space(arr):
    return _SCALAR_SPACE if arr.ndim == 0 else h5py.h5s.create_simple(arr.shape)


def set_attrs(obj, attrs: dict, fresh: bool = False) -> None:
    """Attributes on an h5py object or a low-level id (`fresh`: it has none yet)."""
    oid = obj.id if isinstance(obj, h5py.HLObject) else obj
    for key, value in attrs.items():
        arr, tid = _array_and_type(value)
        name = key.encode()
        if not fresh and h5py.h5a.exists(oid, name):
            h5py.h5a.delete(oid, name)
        h5py.h5a.create(oid, name, tid, _space(arr)).write(arr)


def write_value(group_id, name: str, value, attrs: dict) -> None:
    """Dataset `name` in the group of low-level id `group_id`: `value` and its `attrs`."""
    arr, tid = _array_and_type(value)
    compact = arr.dtype.kind != "O" and arr.nbytes <= _COMPACT_MAX
    dset = h5py.h5d.create(group_id, name.encode(), tid, _space(arr), dcpl=_dcpl(compact))
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, arr)
    set_attrs(dset, attrs, fresh=True)
