"""Points of `json` streams in a layout SWMR readers can read while it grows: the JSON texts
one after the other in a uint8 dataset, and one [start, stop) row per point beside them
(layout and reading: :mod:`blissdata.json_points`). Both datasets are created together,
when the stream's dataset is (HDF5 SWMR allows no new object once writing has started).

Variable-length strings (what :class:`writer.hdf5.text_appender.TextAppender` writes, as
blisswriter 3 does) are not readable by SWMR readers while they are appended: measured,
"actual len exceeds EOA" on almost every read (docs/files.md)."""

from __future__ import annotations

import json

import h5py
import numpy as np

from blissdata.json_points import NOT_WRITTEN, TEXT_ATTR, text_dataset, text_name

from .compression import parse_compression
from .dataset_writer import DatasetAppender
from .last_row import last_chunks

#: bytes per chunk of the texts: what a flush rewrites at most when the chunk is stored
#: compressed (SWMR: a partial chunk is stored raw and rewritten in place), and what the
#: last chunk of a scan holds at most beyond its texts
TEXT_CHUNK_BYTES = 64 * 1024


class JsonAppender:
    """DatasetAppender's surface (append, flush, close, npoints, pending_bytes, dataset,
    name) for a json stream: the rows' dataset is the stream's dataset."""

    def __init__(self, group: h5py.Group, name: str, compression=None, attrs=None, *,
                 executor=None, workers=None, npoints=None, count_time=None):
        companion = text_name(name)
        if companion in group:
            raise ValueError(f"{group.file.filename}: {group.name}/{companion} exists; it is "
                             f"where the texts of the points of {name!r} go")
        text = group.create_dataset(companion, shape=(0,), maxshape=(None,), dtype=np.uint8,
                                    chunks=(TEXT_CHUNK_BYTES,), fillvalue=0,
                                    **parse_compression(compression).h5py_kwargs())
        self._text = DatasetAppender.open(text, executor=executor, workers=workers)
        attrs = {**(attrs or {}), TEXT_ATTR: text.name}
        self._rows = DatasetAppender(group, name, np.int64, (2,), compression,
                                     fill_value=NOT_WRITTEN, attrs=attrs, executor=executor,
                                     workers=workers, npoints=npoints, count_time=count_time)
        self._pending: list[bytes] = []  # texts appended, not yet in the file
        self._pending_bytes = 0

    @classmethod
    def open(cls, dataset: h5py.Dataset, *, executor=None, workers=None) -> "JsonAppender":
        """Resume on the rows' `dataset` (already cut to the points to keep): the texts are
        cut to the end of the last row kept."""
        text = text_dataset(dataset)
        if text is None:
            raise ValueError(f"{dataset.name} in {dataset.file.filename}: its texts "
                             f"({dataset.attrs.get(TEXT_ATTR)!r}) are not in the file")
        keep = dataset.shape[0]
        end = int(dataset[keep - 1][1]) if keep else 0
        if end < 0 or text.shape[0] < end:
            raise ValueError(f"{dataset.name} in {dataset.file.filename}: point {keep - 1} "
                             f"ends at byte {end}, {text.name} holds {text.shape[0]}")
        if text.shape[0] > end:
            last_chunks(text)  # a torn last chunk must not reach the resize's decoder
            text.resize(end, axis=0)
        self = cls.__new__(cls)
        self._text = DatasetAppender.open(text, executor=executor, workers=workers)
        self._rows = DatasetAppender.open(dataset, executor=executor, workers=workers)
        self._pending, self._pending_bytes = [], 0
        return self

    dataset = property(lambda self: self._rows.dataset)
    name = property(lambda self: self._rows.name)

    @property
    def npoints(self) -> int:
        return self._rows.npoints + len(self._pending)

    def __len__(self) -> int:
        return self.npoints

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes + self._text.pending_bytes + self._rows.pending_bytes

    def append(self, points: list) -> None:
        """JSON values (what json.loads gives). Kept until flush(): a row must never reach
        the file before its text (see flush)."""
        # ASCII (json's default): always valid UTF-8, also for lone surrogates
        texts = [json.dumps(p).encode() for p in points]
        self._pending.extend(texts)
        self._pending_bytes += sum(map(len, texts))

    def flush(self, final: bool = False) -> int:
        """Store the texts, flush them to disk (HDF5's H5Dflush), then store their rows: a
        reader that sees a row finds its text. Returns the points stored (rows and texts);
        after a failed write, the points stored before it."""
        if self._pending:
            start = self._text.npoints
            self._text.append(np.frombuffer(b"".join(self._pending), np.uint8))
            stored = self._text.flush(final)
            if stored < start + self._pending_bytes:  # a write failed: no row for it
                return self._rows.flush(final)
            self._text.dataset.flush()
            stops = start + np.cumsum([len(t) for t in self._pending], dtype=np.int64)
            self._rows.append(np.stack([stops - [len(t) for t in self._pending], stops], 1))
            self._pending, self._pending_bytes = [], 0
        elif final:
            self._text.flush(final)  # its last chunk at its exact size
        return self._rows.flush(final)

    def close(self) -> int:
        n = self.flush(final=True)
        self._text.close()
        self._rows.close()
        return n
