"""The points of a `json` stream in a file: layout and reading.

Layout (written by blisswriter in SWMR mode, read by archives, readers of trimmed points,
h5api and replay; docs/files.md):

- ``<name>_json_text``: uint8, the points' JSON texts (UTF-8, ASCII in practice) one after
  the other, nothing between them;
- ``<name>``: int64, shape ``(npoints, 2)``: row i is ``[start, stop)`` of point i's text in
  ``<name>_json_text``; its attribute ``json_text`` is the absolute path, in the file, of
  that dataset. A row of ``-1`` (the fill value) is a point not written yet.

Both datasets only grow, which is what HDF5's SWMR mode allows while readers read: the
writer appends a batch's texts and flushes them to disk before it appends their rows, so a
row a reader sees always points at text already in the file (refresh the rows first, then
the text).

Files of older writers (and blisswriter 3 files, ``blissdata2`` protocol) hold one
variable-length string per point in ``<name>``; those come back the same way. Variable-length
strings cannot be read by SWMR readers while they are appended (measured: "actual len exceeds
EOA" on almost every read), hence this layout.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from .point_shapes import companion_dataset

TEXT_ATTR = "json_text"
NOT_WRITTEN = -1  # fill value of the rows: a point whose row is not in the file yet


def text_name(name: str) -> str:
    """Name of the dataset holding the JSON texts of the points of dataset `name`."""
    return f"{name}_json_text"


def is_text_index(dataset: h5py.Dataset) -> bool:
    """Whether `dataset` holds [start, stop) rows into a text dataset (else one string per
    point, as older files have)."""
    return TEXT_ATTR in dataset.attrs


def text_dataset(dataset: h5py.Dataset) -> h5py.Dataset | None:
    """The dataset of the JSON texts that `dataset`'s rows point into, or None."""
    return companion_dataset(dataset, TEXT_ATTR)


class PointsNotThere(ValueError):
    """Rows or texts a reader asked for are not in the file (yet); the message says which."""


def json_points(dataset: h5py.Dataset, start: int, data, refresh: bool = False) -> list:
    """`data` = ``dataset[start:start + len(data)]`` as the points' Python values.

    Rows of the text layout: their texts are read in one piece from the text dataset
    (refreshed first when `refresh` and it shows fewer bytes than needed, SWMR).
    Older files: one JSON string per point. PointsNotThere if a row or a text is missing."""
    if not is_text_index(dataset):
        return [json.loads(v) for v in data]
    rows = np.asarray(data, dtype=np.int64).reshape(-1, 2)
    if not len(rows):
        return []
    missing = np.flatnonzero((rows < 0).any(axis=1))
    if len(missing):
        raise PointsNotThere(f"{dataset.file.filename} dataset {dataset.name}: point "
                             f"{start + int(missing[0])} is not written yet")
    text = text_dataset(dataset)
    if text is None:
        raise PointsNotThere(f"{dataset.file.filename} dataset {dataset.name}: its texts "
                             f"({dataset.attrs[TEXT_ATTR]!r}) are not in the file")
    lo, hi = int(rows[0, 0]), int(rows[-1, 1])
    if refresh and text.shape[0] < hi and text.file.swmr_mode:
        text.refresh()
    if text.shape[0] < hi:
        raise PointsNotThere(f"{dataset.file.filename} dataset {text.name} holds "
                             f"{text.shape[0]} bytes, points [{start}, {start + len(rows)}) "
                             f"need {hi}")
    blob = text[lo:hi].tobytes()
    return [json.loads(blob[a - lo:b - lo]) for a, b in rows.tolist()]
