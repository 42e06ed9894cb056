"""The datasets of one scan's streams in its entry: an appender per stream (new, or reopened
on a resume and cut to the points published as durable), their definitions and paths.

``entry.ScanEntry`` makes them when it opens the entry and drops them when it lets go of the
file; the pump (``pump.Pump``) appends to them.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from blissdata.encoding import StreamDefinition

from ..hdf5.dataset_writer import DatasetAppender
from ..hdf5.json_appender import JsonAppender
from ..hdf5.last_row import last_chunks
from ..hdf5.references import ReferencesAppender
from ..hdf5.text_appender import TextAppender
from .errors import ScanFailed
from .names import nexus_name


class StreamDatasets:
    """Stream name -> appender, definition and dataset path, for one scan."""

    def __init__(self, service, *, dataset_parent, check_source, swmr_possible,
                 varying_appender, json_appender):
        """`dataset_parent(path)`, `check_source(path)` and `swmr_possible()`: the entry's
        (a protocol places datasets its own way); the appenders: ScanWriter's knobs."""
        self.service = service
        self.config = service.config
        self._dataset_parent = dataset_parent
        self._check_source = check_source
        self._swmr_possible = swmr_possible
        self.varying_appender = varying_appender
        self.json_appender = json_appender
        self.scan = None  # the scan and its own file, as of the last create()
        self.file_path: Path | None = None
        self.appenders: dict[str, DatasetAppender] = {}  # stream name -> appender
        self.definitions: dict[str, StreamDefinition] = {}  # as they were when writing began
        self.dataset_paths: dict[str, str] = {}  # stream name -> dataset path in the file

    def create(self, scan, layout, resume: bool, file_path: Path) -> None:
        """An appender for each stream of `layout` (the entry's file lock held): new, or
        (`resume`) on the dataset a writer before left, cut to the durable points."""
        self.scan, self.file_path = scan, file_path
        durable = self._durable_points() if resume else {}
        for node in layout.streams:
            definition: StreamDefinition = self.scan.streams[node.stream].definition
            group, name = self._dataset_parent(node.path)
            if node.stream in self.appenders:  # the same stream at a second place
                if name not in group and definition.encoding == "references":
                    # its virtual dataset is rebuilt at each flush: link by path
                    group[name] = h5py.SoftLink(self.dataset_paths[node.stream])
                elif name not in group:  # one dataset, written once, at both places
                    group[name] = self.appenders[node.stream].dataset
                continue
            self.definitions[node.stream] = definition
            if definition.encoding == "references" and self._swmr_possible():
                appender = self._references_in_own_file(group, name, node, definition,
                                                        durable if resume else None)
            elif name in group and resume:
                appender = self._reopen(group[name], definition, durable.get(node.stream, 0))
            elif definition.encoding == "json":
                appender = self._new_json_appender(group, name, node)
            elif definition.encoding == "references":
                appender = ReferencesAppender(group, name, self.file_path, self._check_source,
                                              attrs=node.attrs, definition=definition,
                                              base=Path(self.scan.path).parent)
            else:  # points of varying shape: their shapes too, in a dataset beside them
                kind = self.varying_appender if definition.varying else DatasetAppender
                appender = kind(
                    group, name, definition.dtype, definition.shape,
                    compression=self.config.compression_for(
                        node.stream, scalar=tuple(definition.shape) == ()),
                    fill_value=self._fill_value(definition), attrs=node.attrs,
                    executor=self.service.pool, workers=self.config.compression_threads,
                    npoints=self.scan.info.get("npoints"),
                    count_time=self.scan.info.get("count_time"))
            self.appenders[node.stream] = appender
            self.dataset_paths[node.stream] = f"{group.name}/{name}"

    def _reopen(self, dataset, definition: StreamDefinition, durable: int):
        """Resume on a dataset written before a crash: keep only the points published as
        durable (what came after may be half-written); Redis still has the rest."""
        keep = min(durable, dataset.shape[0])
        try:  # a ValueError says what in the file cannot be appended to (a torn chunk, ...)
            if dataset.shape[0] != keep:
                last_chunks(dataset)  # a torn last row must not reach the resize's decoder
                dataset.resize(keep, axis=0)
            if definition.encoding == "json" and dataset.dtype.kind in "OSU":
                return TextAppender.open(dataset)  # a file of an older version
            if definition.encoding == "json":
                return JsonAppender.open(dataset, executor=self.service.pool,
                                         workers=self.config.compression_threads)
            if definition.encoding == "references":
                return ReferencesAppender.open(dataset, self.file_path, self._check_source,
                                               definition,
                                               base=Path(self.scan.path).parent)
            kind = self.varying_appender if definition.varying else DatasetAppender
            return kind.open(dataset, executor=self.service.pool,
                             workers=self.config.compression_threads)
        except ValueError as exc:
            raise ScanFailed(str(exc)) from None

    def _references_in_own_file(self, group, name: str, node, definition, durable):
        """A `references` stream of a scan written in SWMR mode: its virtual dataset in a
        file of its own, replaced whole at each flush (writer/hdf5/references.py), e.g.
        ``sample_3.1_eiger_image.h5`` beside ``sample_3.1.h5``."""
        stem = f"{self.file_path.stem}_{nexus_name(node.stream)}"
        own_file = self.file_path.with_name(stem + ".h5")
        taken = {getattr(a, "own_file", None) for a in self.appenders.values()}
        k = 1
        while own_file in taken:  # two stream names that give the same file name
            k += 1
            own_file = self.file_path.with_name(f"{stem}_{k}.h5")
        self._check_source(str(own_file))
        base = Path(self.scan.path).parent
        if durable is not None:
            return ReferencesAppender.open_own_file(
                group, name, own_file, self.file_path, self._check_source,
                durable.get(node.stream, 0), definition, base)
        return ReferencesAppender(group, name, self.file_path, self._check_source,
                                  attrs=node.attrs, definition=definition, base=base,
                                  own_file=own_file)

    def _new_json_appender(self, group, name: str, node):
        if self.json_appender is TextAppender:
            return TextAppender(group, name, attrs=node.attrs)
        return self.json_appender(
            group, name, compression=self.config.compression_for(node.stream, scalar=True),
            attrs=node.attrs, executor=self.service.pool,
            workers=self.config.compression_threads, npoints=self.scan.info.get("npoints"),
            count_time=self.scan.info.get("count_time"))

    def _fill_value(self, definition: StreamDefinition):
        return np.nan if np.dtype(definition.dtype).kind in "fc" else self.config.fill_value_int

    def _durable_points(self) -> dict[str, int]:
        return {name: (s.file_backing or {}).get("points", 0)
                for name, s in self.scan.streams.items()}

    def soft_links_to_own_files(self, entry) -> None:
        """Soft links to a `references` stream in its own file (the default plot, a second
        place, a mapping SOFT_LINK) become external links to that file: nexusformat loops
        forever on a soft link to an external link inside a file it reached through an
        external link (the shared file)."""
        targets = {self.dataset_paths[n]: entry.file.get(self.dataset_paths[n], getlink=True)
                   for n, a in self.appenders.items() if getattr(a, "own_file", None)}
        if not targets:
            return
        found = []
        entry.visititems_links(lambda name, link: found.append(name) if isinstance(
            link, h5py.SoftLink) and link.path in targets else None)
        for name in found:
            target = targets[entry.get(name, getlink=True).path]
            del entry[name]
            entry[name] = h5py.ExternalLink(target.filename, target.path)

