"""Streams whose point shape varies (-1 dims): the padded points and, beside them, the shape
of each point (layout: :mod:`blissdata.point_shapes`). Both datasets are created together,
when the stream's dataset is (HDF5 SWMR allows no new object once writing has started)."""

from __future__ import annotations

import h5py
import numpy as np

from blissdata.point_shapes import SHAPES_ATTR, shapes_dataset, shapes_name

from .dataset_writer import DatasetAppender
from .last_row import last_chunks


class VaryingPointsAppender:
    """DatasetAppender's surface (append, append_varying, flush, close, npoints, stored,
    pending_bytes, dataset, name) over the points' dataset and their shapes' dataset."""

    def __init__(self, group: h5py.Group, name: str, dtype, point_shape, compression=None,
                 fill_value=None, attrs=None, *, executor=None, workers=None, npoints=None,
                 count_time=None):
        companion = shapes_name(name)
        if companion in group:
            raise ValueError(f"{group.file.filename}: {group.name}/{companion} exists; it is "
                             f"where the shapes of the points of {name!r} go")
        self._shapes = DatasetAppender(group, companion, np.int64, (len(point_shape),),
                                       compression=compression, executor=executor,
                                       workers=workers, npoints=npoints, count_time=count_time)
        attrs = {**(attrs or {}), SHAPES_ATTR: self._shapes.name}
        self._points = DatasetAppender(group, name, dtype, point_shape, compression,
                                       fill_value, attrs, executor=executor, workers=workers,
                                       npoints=npoints, count_time=count_time)

    @classmethod
    def open(cls, dataset: h5py.Dataset, *, executor=None, workers=None):
        """Resume on `dataset` (already cut to the points to keep). A dataset written without
        point shapes resumes as a plain DatasetAppender (padded points)."""
        points = DatasetAppender.open(dataset, executor=executor, workers=workers)
        shapes = shapes_dataset(dataset)
        if shapes is None:
            return points
        keep = dataset.shape[0]
        if shapes.shape[0] < keep:
            raise ValueError(f"{shapes.name} in {dataset.file.filename} holds {shapes.shape[0]} "
                             f"point shapes, the points {keep}")
        if shapes.shape[0] > keep:
            last_chunks(shapes)  # a torn last row must not reach the resize's decoder
            shapes.resize(keep, axis=0)
        self = cls.__new__(cls)
        self._points = points
        self._shapes = DatasetAppender.open(shapes, executor=executor, workers=workers)
        return self

    dataset = property(lambda self: self._points.dataset)
    name = property(lambda self: self._points.name)
    npoints = property(lambda self: self._points.npoints)
    stored = property(lambda self: min(self._points.stored, self._shapes.stored))
    pending_bytes = property(lambda self: (self._points.pending_bytes
                                           + self._shapes.pending_bytes))

    def __len__(self) -> int:
        return self.npoints

    def append(self, points) -> None:
        arr = np.asarray(points)
        self._points.append(arr)
        self._shapes.append(np.tile(np.asarray(arr.shape[1:], np.int64), (len(arr), 1)))

    def append_varying(self, points) -> None:
        points = [np.asarray(p) for p in points]
        self._points.append_varying(points)
        self._shapes.append(np.array([p.shape for p in points], np.int64).reshape(
            len(points), -1))

    def flush(self, final: bool = False) -> int:
        """Points whose values and shapes are both in the file."""
        return min(self._points.flush(final), self._shapes.flush(final))

    def close(self) -> int:
        return min(self._points.close(), self._shapes.close())
