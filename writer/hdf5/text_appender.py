"""Points of json / references streams: one UTF-8 JSON text per point, in a resizable dataset."""

from __future__ import annotations

import json

import h5py

_TEXT = h5py.string_dtype("utf-8")


class TextAppender:
    """The same surface as DatasetAppender (append, flush, npoints, pending_bytes, dataset)."""

    def __init__(self, group: h5py.Group, name: str, attrs=None):
        self._dset = group.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_TEXT,
                                          chunks=(256,))
        self._dset.attrs["interpretation"] = "json"
        if attrs:
            self._dset.attrs.update(attrs)

    @classmethod
    def open(cls, dataset: h5py.Dataset) -> "TextAppender":
        self = cls.__new__(cls)
        self._dset = dataset
        return self

    @property
    def dataset(self) -> h5py.Dataset:
        return self._dset

    @property
    def npoints(self) -> int:
        return self._dset.shape[0]

    pending_bytes = 0

    def append(self, points: list) -> None:
        start = self._dset.shape[0]
        self._dset.resize(start + len(points), axis=0)
        self._dset[start:] = [json.dumps(p) for p in points]

    def flush(self, final: bool = False) -> int:  # same signature as DatasetAppender
        return self._dset.shape[0]
