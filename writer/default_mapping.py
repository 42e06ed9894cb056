"""The mapping used for a scan whose header has none: every stream under `measurement`."""

from __future__ import annotations

import re


def default_mapping(streams: dict) -> list:
    """{stream name: Stream} -> NXentry mapping with an NXcollection `measurement` holding one
    STREAM leaf per stream (name: the stream name with characters HDF5 dislikes replaced)."""
    children = {}
    for name in streams:
        leaf = re.sub(r"[/.\s]", "_", name).replace(":", "_") or "stream"
        while leaf in children:
            leaf += "_"
        children[leaf] = [{}, "STREAM", name]
    return [{"NX_class": "NXentry"},
            {"measurement": [{"NX_class": "NXcollection"}, children]}]
