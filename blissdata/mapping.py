"""Writing a scan's `mapping` (its NeXus layout) in Python, as in the talk.

A node is a group ``(attrs, children)`` or a leaf ``(attrs, KIND, value)``; tuples, lists or
any other sequence, as the producer likes: ``Scan.prepare()`` stores them as JSON lists
(schema: ``blissdata/schemas/mapping.json``). The kinds are these constants::

    from blissdata import RAW, STREAM
    scan.info["mapping"] = ({"NX_class": "NXentry"}, {
        "title": ({}, RAW, "ascan sy 0 1 10 0.1"),
        "measurement": ({"NX_class": "NXcollection"}, {
            "diode": ({"units": "V"}, STREAM, "diode:diode")})})
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

from .exceptions import SchemaError

RAW = "RAW"                      # a static value: number, string, list, nested lists
STREAM = "STREAM"                # the name of a stream of this scan
SOFT_LINK = "SOFT_LINK"          # an entry-relative path ("/instrument/diode/data")
EXTERNAL_LINK = "EXTERNAL_LINK"  # {"file": ..., "path": ...} in another file
KINDS = (RAW, STREAM, SOFT_LINK, EXTERNAL_LINK)


def json_compatible(value, where: str = "$"):
    """`value` with tuples (any sequence) as lists and numpy scalars/arrays as Python values,
    ready for json.dumps and the JSON Schemas; SchemaError naming the path of a value that
    JSON cannot hold (a set, an object, ...)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, (int, float, bool)) or key is None:
                key = json.dumps(key)  # as json.dumps would store it
            elif not isinstance(key, str):
                raise SchemaError(f"{where}: key {key!r} is not a string (JSON keys are)")
            out[key] = json_compatible(item, f"{where}.{key}")
        return out
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [json_compatible(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise SchemaError(f"{where}: a value of type {type(value).__name__} ({value!r:.60}) "
                      f"cannot be stored as JSON")
