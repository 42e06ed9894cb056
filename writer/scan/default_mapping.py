"""The mapping used for a scan whose header has none: every stream under `measurement`."""

from __future__ import annotations

from .names import nexus_name


def default_mapping(streams: dict) -> list:
    """{stream name: Stream} -> NXentry mapping with an NXcollection `measurement` holding one
    STREAM leaf per stream, named after the stream as a valid NeXus name (`nexus_name`; made
    unique by appending "_"); a leaf whose name differs keeps the stream's name in its
    `stream_name` attribute."""
    children = {}
    for name in streams:
        leaf = nexus_name(name)
        while leaf in children:
            leaf += "_"
        children[leaf] = [{} if leaf == name else {"stream_name": name}, "STREAM", name]
    return [{"NX_class": "NXentry"},
            {"measurement": [{"NX_class": "NXcollection"}, children]}]
