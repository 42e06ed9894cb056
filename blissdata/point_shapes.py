"""Points whose shape varies from one to the next (``-1`` in a stream's point shape) are stored
in one HDF5 dataset padded to the largest point; the shape of each point is stored beside
it, so readers give back each point as it was published.

Layout (written by blisswriter, read by archives, readers of trimmed points and replay):

- ``<name>``: the points, shape ``(npoints, *largest point)``, padded with the fill value;
  its attribute ``point_shapes`` is the absolute path, in the file, of
- ``<name>_point_shapes``: int64, shape ``(npoints, ndim of a point)``: row i is point i's shape.

Files without the attribute (older ones, other programs) give the points padded.
"""

from __future__ import annotations

import h5py
import numpy as np

SHAPES_ATTR = "point_shapes"


def shapes_name(name: str) -> str:
    """Name of the dataset holding the shapes of the points of dataset `name`."""
    return f"{name}_point_shapes"


def shapes_dataset(dataset: h5py.Dataset) -> h5py.Dataset | None:
    """The dataset of `dataset`'s point shapes, or None if the file has none."""
    return companion_dataset(dataset, SHAPES_ATTR)


def companion_dataset(dataset: h5py.Dataset, attr: str) -> h5py.Dataset | None:
    """The dataset whose path in the file `dataset`'s attribute `attr` names (the shapes of
    its points, the texts of json points), or None if it has no such attribute or dataset."""
    path = dataset.attrs.get(attr)
    if path is None:
        return None
    path = path.decode() if isinstance(path, bytes) else str(path)
    found = dataset.file.get(path)
    if found is None:  # the entry was moved or renamed: look beside `dataset`
        found = dataset.parent.get(path.rsplit("/", 1)[-1])
    return found if isinstance(found, h5py.Dataset) else None


def varying_points(dataset: h5py.Dataset, start: int, data) -> list:
    """`data` = ``dataset[start:start + len(data)]`` (padded points) as a list of points,
    each cut to its own shape where the file has it."""
    shapes = shapes_dataset(dataset)
    if shapes is None:
        return list(data)
    rows = np.asarray(shapes[start:start + len(data)])
    points = [p[tuple(slice(0, int(n)) for n in shape)] for p, shape in zip(data, rows)]
    return points + list(data[len(points):])  # shapes not (yet) there: as stored
