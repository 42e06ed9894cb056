"""Writes the static part of a NeXus entry from a Layout: groups, attributes, RAW datasets,
links, title, start/end times, the default plot and the @default chain. Streamed datasets are
created by the appenders (writer/hdf5/dataset_writer.py) under the groups made here."""

from __future__ import annotations

import datetime

import h5py
import numpy as np

from blissdata.h5values import TEXT, set_attrs, write_value

from .mapping import Layout


class EntryExistsError(ValueError):
    """The entry is already in the file: the writer never overwrites."""


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat()


def _file_attrs(h5file: h5py.File) -> None:
    if "NX_class" in h5file.attrs:
        return
    h5file.attrs.update({"NX_class": "NXroot", "file_name": h5file.filename,
                         "file_time": _now(), "creator": "blisswriter",
                         "HDF5_Version": h5py.version.hdf5_version,
                         "h5py_version": h5py.version.version})


def write_entry(h5file: h5py.File, entry_name: str, layout: Layout, info: dict,
                stream_ranks: dict | None = None) -> h5py.Group:
    """Create entry `entry_name` (EntryExistsError if it is there) with everything static.

    `stream_ranks`: stream name -> number of dimensions of its dataset, to give the default
    plot's @axes one entry per dimension ("." where there is no axis)."""
    if entry_name in h5file:
        raise EntryExistsError(f"entry {entry_name} already exists in {h5file.filename}; "
                               f"the writer never overwrites an entry")
    _file_attrs(h5file)
    entry = h5file.create_group(entry_name)
    entry.attrs["NX_class"] = "NXentry"
    set_attrs(entry, layout.entry_attrs)
    ids = {"/": entry.id}
    for group in layout.groups:  # parents come before their children
        parent, name = group.path.rsplit("/", 1)
        gid = h5py.h5g.create(ids[parent or "/"], name.encode())
        ids[group.path] = gid
        set_attrs(gid, group.attrs, fresh=True)
    for raw in layout.raws:
        parent, name = raw.path.rsplit("/", 1)
        write_value(ids[parent or "/"], name, raw.value, raw.attrs)
    for link in layout.soft_links:
        entry[link.path[1:]] = h5py.SoftLink(f"/{entry_name}{link.target}")
    for link in layout.external_links:
        entry[link.path[1:]] = h5py.ExternalLink(link.file, link.target)
    for name, key in (("title", "title"), ("start_time", "start_time")):
        if name not in entry and info.get(key):
            entry[name] = str(info[key])
    _write_default_plot(entry, layout, stream_ranks or {})
    if "default" not in h5file.attrs:
        h5file.attrs["default"] = entry_name
    return entry


def _write_default_plot(entry: h5py.Group, layout: Layout, stream_ranks: dict) -> None:
    plot = layout.default_plot
    if plot is None:
        return
    if plot.create:
        group = entry.create_group(plot.path[1:])
        group.attrs["NX_class"] = "NXdata"
        for name, target in plot.fields.items():
            group[name] = h5py.SoftLink(f"{entry.name}{target}")
        group.attrs["signal"] = plot.signal
        signal_stream = next((s.stream for s in layout.streams
                              if s.path == plot.fields.get(plot.signal)), None)
        rank = stream_ranks.get(signal_stream, 1)
        axes = (plot.axes + ["."] * rank)[:max(rank, len(plot.axes))]
        group.attrs["axes"] = np.array(axes, dtype=TEXT)  # "." = no axis for that dimension
    else:
        group = entry[plot.path[1:]]
        if "signal" not in group.attrs:
            group.attrs["signal"] = plot.signal
    # @default chain from the entry down to the NXdata group
    node = entry
    for part in plot.path[1:].split("/"):
        node.attrs["default"] = part
        node = node[part]


def stream_dataset_parent(entry: h5py.Group, path: str) -> tuple[h5py.Group, str]:
    """(group, dataset name) where the STREAM leaf at entry-relative `path` goes."""
    parent, name = path.rsplit("/", 1)
    return (entry.require_group(parent[1:]) if parent else entry), name


#: room of the text fields made before SWMR writing starts and filled later (ISO 8601
#: times, end reasons): fixed-length strings are changed where they lie
END_FIELD_BYTES = 64
END_FIELDS = ("start_time", "end_time", "end_reason")


def prepare_end_fields(entry: h5py.Group) -> None:
    """Create start_time (unless there), end_time and end_reason empty, to be filled by
    :func:`set_text_field`: no object may be created once SWMR writing has started."""
    for name in END_FIELDS:
        if name not in entry:
            entry.create_dataset(name, shape=(), dtype=f"S{END_FIELD_BYTES}")


def set_text_field(entry: h5py.Group, name: str, value: str) -> None:
    """`entry/name` = value: in place if it is a fixed-length string with room for it (the
    only way once SWMR writing has started), else made again."""
    data = value.encode()
    dset = entry.get(name)
    if (dset is not None and dset.dtype.kind == "S" and dset.shape == ()
            and len(data) <= dset.dtype.itemsize):
        dset[()] = np.bytes_(data)
        return
    if entry.file.swmr_mode:  # no new object: keep what fits
        if dset is not None and dset.dtype.kind == "S" and dset.shape == ():
            dset[()] = np.bytes_(data[:dset.dtype.itemsize])
        return
    if dset is not None:
        del entry[name]
    entry[name] = value


def is_finalized(entry: h5py.Group) -> bool:
    """Whether the entry has its end_reason (set by :func:`finalize_entry`)."""
    reason = entry.get("end_reason")
    return reason is not None and bool(reason[()])


def finalize_entry(entry: h5py.Group, info: dict, end_reason: str) -> None:
    """end_time (info's or now) and end_reason: the entry is complete. Also start_time, when
    the scan started after the entry was made (the writer starts at PREPARED)."""
    start = entry.get("start_time")
    if info.get("start_time") and (start is None or not start[()]):
        set_text_field(entry, "start_time", str(info["start_time"]))
    set_text_field(entry, "end_time", str(info.get("end_time") or _now()))
    set_text_field(entry, "end_reason", str(end_reason))
