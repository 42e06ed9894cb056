"""For a mesh scan (info `grid_shape` [slow, fast] and `grid_axes` [slow stream, fast
stream]): an NXdata `grid` that shows the 1D signal as an image.

Made when the entry is made (before SWMR writing starts, when no dataset has points yet):
the image is a virtual dataset over the signal's own dataset (no copy) and the axes are
virtual datasets over every `fast`-th point of the slow axis and the first `fast` points of
the fast one, so they fill as the points arrive."""

from __future__ import annotations

import h5py

from .names import nexus_name


def write_grid_plot(entry: h5py.Group, info: dict, stream_datasets: dict) -> str | None:
    """Make `<entry>/grid`; returns why not when it cannot (None when done).

    `stream_datasets`: stream name -> its h5py dataset in this entry."""
    shape, axes = info.get("grid_shape"), info.get("grid_axes")
    if not shape or not axes or len(shape) != 2 or len(axes) != 2:
        return "no grid_shape/grid_axes of 2 dimensions in the header"
    default = entry.attrs.get("default")
    if default is None or default not in entry:
        return "the entry has no default plot"
    plot = entry[default]
    signal = plot.get(plot.attrs.get("signal", ""))
    ny, nx = (int(v) for v in shape)
    if signal is None or signal.ndim != 1:
        return "the default plot's signal is not a stream of scalars"
    missing = [a for a in axes if a not in stream_datasets]
    if missing:
        return f"grid axes {missing} are not streams written in this entry"
    slow, fast = (stream_datasets[a] for a in axes)
    if slow.ndim != 1 or fast.ndim != 1:
        return "the grid axes are not streams of scalars"
    group = entry.create_group("grid")
    group.attrs["NX_class"] = "NXdata"
    layout = h5py.VirtualLayout(shape=(ny, nx), dtype=signal.dtype)
    source = h5py.VirtualSource(".", signal.name, shape=(ny * nx,))
    for row in range(ny):
        layout[row] = source[row * nx:(row + 1) * nx]
    name = plot.attrs["signal"]
    group.create_virtual_dataset(name, layout)
    # field names from the stream names ("axis:samy" -> "samy"), valid NeXus and distinct
    slow_name, fast_name = (nexus_name(a.rsplit(":", 1)[-1]) for a in axes)
    while slow_name == name:
        slow_name += "_"
    while fast_name in (slow_name, name):
        fast_name += "_"
    for field, dataset, points in ((slow_name, slow, slice(None, None, nx)),
                                   (fast_name, fast, slice(0, nx))):
        axis = h5py.VirtualLayout(shape=(ny if points.step else nx,), dtype=dataset.dtype)
        axis[:] = h5py.VirtualSource(".", dataset.name, shape=(ny * nx,))[points]
        group.create_virtual_dataset(field, axis)
    for field, dataset, stream in ((slow_name, slow, axes[0]), (fast_name, fast, axes[1])):
        if "units" in dataset.attrs:
            group[field].attrs["units"] = dataset.attrs["units"]
        if field != stream:
            group[field].attrs["stream_name"] = stream
    group.attrs["signal"] = name
    group.attrs["axes"] = [slow_name, fast_name]
    group.attrs["interpretation"] = "image"
    entry.attrs["default"] = "grid"
    return None
