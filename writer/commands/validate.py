"""`blisswriter validate FILE...`: NeXus validation of written files, offline, with nexusformat
(it bundles the NeXus definitions). nexusformat's own commands exit 0 even on errors; this one
collects what it reports and exits 1 when any file has an error (2: a file is missing, is
not HDF5 or cannot be read; 3: a scan of it is still being written, see below; with several
files, the highest of these), so it can gate a CI job.

It never writes and never needs write permission (archived files are often read-only):
nexusformat reads the tree of a read-only open (its own validator opens files read-write).
A file with a scan still being written (HDF5 marks it open for writing, or a shared file's
entry links to such a file) is not validated: it says which scan and its state, exit 3.

What counts: nexusformat's errors are errors and its warnings are warnings, each with the HDF5
path it is about, with two adjustments:

- stricter: a default plot whose @signal or @axes names a field that is not there, and a value
  that is not of its NeXus type (e.g. a start_time that is not ISO 8601), are errors here
  (nexusformat only warns): viewers break on them;
- looser: nexusformat checks names against the strict recommended rule
  (``^[a-zA-Z_][a-zA-Z0-9_]*$``); NXDL's own rule for valid names
  (``^[a-zA-Z0-9_]([a-zA-Z0-9_.]*[a-zA-Z0-9_])?$``) also allows names such as the entry
  ``"3.1"`` this writer makes (the BLISS convention users asked for): warnings here;
- nexusformat misreads the shape of a virtual dataset made of several source files: an axis
  "inconsistent with the signal shape" whose sizes h5py finds consistent is a warning;
- added, as punx checks it (NeXus "default plot", NIAC2014 rule): the file's ``@default``
  must name an NXentry, and every NXentry's ``@default`` an NXdata in it whose ``@signal``
  names a field there; anything else is an error naming the group;
- added: a virtual dataset whose source file or dataset is missing is an error (HDF5 reads its
  points as the fill value, zeros, without any error). A relative source is looked for next
  to the file, as HDF5 does.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from blissdata import lost_points

from ..hdf5.being_written import EXIT_BEING_WRITTEN, scans_being_written

NXDL_NAME = re.compile(r"^[a-zA-Z0-9_]([a-zA-Z0-9_.]*[a-zA-Z0-9_])?$")
_CONTEXT = re.compile(r"^\s*(?:NX\w+|Field|Group|Attribute): (/\S*)")
_INVALID_NAME = re.compile(r'^\s*"([^"]+)" is an invalid name')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PROMOTED = re.compile(r"is not present in the group|is not a valid NX_|not a valid NX_")


class ValidationInputError(ValueError):
    """The file cannot be validated at all: missing, or not HDF5."""


@dataclass
class Report:
    path: str
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    being_written: list = field(default_factory=list)  # ScanBeingWritten: not validated

    @property
    def ok(self) -> bool:
        return not self.errors


class _Collector(logging.Handler):
    def __init__(self, report: Report):
        super().__init__(logging.DEBUG)
        self.report = report
        self.where = "/"

    def emit(self, record: logging.LogRecord) -> None:
        message = _ANSI.sub("", record.getMessage())
        context = _CONTEXT.match(message)
        if context:
            self.where = context.group(1)
        if record.levelno == logging.ERROR:
            name = _INVALID_NAME.match(message)
            if name and NXDL_NAME.match(name.group(1)):
                self.report.warnings.append(
                    f"{self.where}: name {name.group(1)!r} follows NXDL's naming rule but not "
                    f"the stricter recommended one")
            else:
                self.report.errors.append(f"{self.where}: {message.strip()}")
        elif record.levelno == logging.WARNING:
            kind = self.report.errors if _PROMOTED.search(message) else self.report.warnings
            kind.append(f"{self.where}: {message.strip()}")


def validate_file(path) -> Report:
    """Validate one file, read only; ValidationInputError if it is missing or not HDF5. A
    file with a scan still being written is not validated: ``report.being_written``."""
    import nexusformat.nexus.validate  # noqa: F401  (its first import sets its logger up)

    path = str(path)
    if not Path(path).exists():
        raise ValidationInputError(f"{path}: no such file")
    if not h5py.is_hdf5(path):
        raise ValidationInputError(f"{path}: not an HDF5 file")
    report = Report(path)
    report.being_written = scans_being_written(path)
    if report.being_written:
        return report
    logger = logging.getLogger("NXValidate")
    saved = (logger.handlers[:], logger.level)
    collector = _Collector(report)
    logger.handlers[:] = [collector]
    logger.setLevel(logging.DEBUG)  # the INFO lines say which path the next finding is about
    logger.total = {"warning": 0, "error": 0}
    try:
        result = _nexusformat_validate(path)
    except Exception as exc:  # nexusformat failing on a file is a finding, not a crash
        report.errors.append(f"/: nexusformat could not read the file: {exc}")
        result = ()
    finally:
        logger.handlers[:], _ = saved
        logger.setLevel(saved[1])
    if result is None and not report.errors:
        report.errors.append("/: nexusformat could not validate the file")
    _recheck_axis_sizes(report)
    _check_default_plots(report)
    _check_virtual_sources(report)
    _check_lost_points(report)
    return report


def _nexusformat_validate(path: str):
    """nexusformat's ``validate_file`` on a read-only open: its own opens the file ``r+``
    (``with root`` reopens it read-write), which changes the file's modification time and
    fails on a file the user may not write. Returns (warnings, errors) as it does."""
    from nexusformat.nexus import nxload
    from nexusformat.nexus.validate import (FileValidator, get_validator, log_header,
                                            log_summary)

    validator = FileValidator(path)
    log_header(validator, filename=path, path="/")
    root = nxload(path, "r", **_how_to_open(path))  # never `with root`: that opens it read-write
    try:
        get_validator(root.nxclass, definitions=validator.definitions).validate(
            root, parent=validator)
    finally:
        root.nxfile.close()
    validator.output_log()
    return log_summary()


def _open(path) -> h5py.File:
    return h5py.File(path, "r", **_how_to_open(path))


def _how_to_open(path) -> dict:
    """How to open `path` read-only with its external links followable. HDF5 opens the files
    behind the links with the locking setting of this open, and refuses one this process
    already has open with the other setting (a writer or a reader in this process)."""
    for how in (dict(locking=False), {}):
        try:
            with h5py.File(path, "r", **how) as f:
                for name in f:
                    f[name]  # noqa: B018  (follows a link: h5py's get() would hide the error)
            return how
        except (KeyError, OSError) as exc:
            if "don't match" not in str(exc):
                return how  # not a locking matter: the checks report what they cannot read
    return {}


def _check_lost_points(report: Report) -> None:
    """Points lost in Redis before the writer stored them: the entry is complete otherwise
    (fill values stand in for them), so a warning naming them, not an error."""
    with _open(report.path) as f:
        for name, group in f.items():
            if not isinstance(group, h5py.Group):
                continue
            lost = lost_points.recorded_in(group)
            if lost:
                report.warnings.append(
                    f"/{name}: {lost_points.count(lost)} points lost in Redis before the "
                    f"writer stored them (fill values in the file, listed in "
                    f"writer_status lost_points): {lost_points.describe(lost)}")


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else (None if value is None
                                                            else str(value))


def _check_default_plots(report: Report) -> None:
    """A viewer opening the file must find something to plot: root @default -> an NXentry,
    each NXentry's @default -> an NXdata with an existing @signal field."""
    with _open(report.path) as f:
        entries = [name for name, link in f.items()
                   if isinstance(link, h5py.Group)
                   and _text(link.attrs.get("NX_class")) == "NXentry"]
        default = _text(f.attrs.get("default"))
        if not entries:
            report.errors.append("/: no NXentry, so no default plot")
            return
        if default is None:
            report.errors.append(f"/: no default plot: @default is missing (it should name "
                                 f"one of the entries {entries[:5]})")
        elif default not in entries:
            report.errors.append(f"/: no default plot: @default = {default!r} is not an "
                                 f"NXentry of this file")
        for name in entries:
            problem = _entry_plot_problem(f[name])
            if problem:
                report.errors.append(f"/{name}: no default plot: {problem}")


def _entry_plot_problem(entry: h5py.Group) -> str | None:
    default = _text(entry.attrs.get("default"))
    if default is None:
        return "@default is missing (it should name an NXdata group of the entry)"
    group = entry.get(default)
    if not isinstance(group, h5py.Group) or _text(group.attrs.get("NX_class")) != "NXdata":
        return f"@default = {default!r} is not an NXdata group of the entry"
    signal = _text(group.attrs.get("signal"))
    if signal is None:
        return f"{group.name} has no @signal"
    if not isinstance(group.get(signal), h5py.Dataset):
        return f"{group.name}@signal = {signal!r} is not a field of that group"
    return None


_AXIS_SIZE = re.compile(r'^(/\S*): Axis "([^"]+)" size is inconsistent with the signal shape')


def _recheck_axis_sizes(report: Report) -> None:
    for message in list(report.errors):
        found = _AXIS_SIZE.match(message)
        if not found:
            continue
        group_path, axis = found.groups()
        with _open(report.path) as f:
            group = f.get(group_path)
            axes = [a.decode() if isinstance(a, bytes) else a
                    for a in group.attrs.get("axes", [])] if group is not None else []
            signal = group.get(group.attrs.get("signal", "")) if group is not None else None
            if signal is None or axis not in axes or axis not in group:
                continue
            i = axes.index(axis)
            if i < signal.ndim and signal.shape[i] == group[axis].shape[0] and signal.is_virtual:
                report.errors.remove(message)
                report.warnings.append(f"{message} (nexusformat misreads virtual datasets; "
                                       f"h5py sees {signal.shape[i]} on both)")


def _check_virtual_sources(report: Report) -> None:
    """An error per virtual dataset whose source file or dataset cannot be found."""
    virtual = []

    def visit(name, link):  # also through external links (a references stream's own file)
        if isinstance(link, (h5py.HardLink, h5py.ExternalLink)):
            try:
                obj = f.get(name)
            except (OSError, KeyError):
                return
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                virtual.append(name)

    checked: dict[tuple[str, str], str | None] = {}  # (file, dataset) -> problem or None
    with _open(report.path) as f:
        f.visititems_links(visit)
        for name in virtual:
            vds = f[name]
            # relative names start at the folder of the file holding the virtual dataset
            folder = Path(vds.file.filename).resolve().parent
            sources = {(vs.file_name, vs.dset_name) for vs in vds.virtual_sources()}
            for file, dset in sorted(sources):
                if (file, dset) not in checked:
                    if file == ".":  # the file itself
                        checked[file, dset] = (None if isinstance(vds.file.get(dset),
                                                                  h5py.Dataset)
                                               else "is missing (no such dataset in this file)")
                    else:
                        where = Path(file) if Path(file).is_absolute() else folder / file
                        checked[file, dset] = _source_problem(where, dset)
                if checked[file, dset]:
                    report.errors.append(f"/{name}: virtual dataset source {file}::{dset} "
                                         f"{checked[file, dset]}: its points read as the "
                                         f"fill value")


def _source_problem(path: Path, dataset: str) -> str | None:
    if not path.exists():
        return f"is missing (no file {path})"
    try:
        with _open(path) as src:
            if not isinstance(src.get(dataset), h5py.Dataset):
                return f"is missing (no dataset {dataset} in {path})"
    except OSError as exc:
        return f"cannot be read ({path}: {exc})"
    return None


def main(files: list[str]) -> int:
    worst = 0
    for path in files:
        try:
            report = validate_file(path)
        except ValidationInputError as exc:
            print(f"{exc}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        except (OSError, KeyError, ValueError, RuntimeError) as exc:  # h5py on a damaged file
            print(f"{path}: cannot be read: {exc}", file=sys.stderr)
            worst = max(worst, 2)
            continue
        if report.being_written:
            for scan in report.being_written:
                print(scan.message(path, "validate"), file=sys.stderr)
            worst = max(worst, EXIT_BEING_WRITTEN)
            continue
        status = "OK" if report.ok else "INVALID"
        print(f"{path}: {status}, {len(report.errors)} errors, {len(report.warnings)} warnings")
        for message in report.errors:
            print(f"  error:   {message}")
        for message in report.warnings:
            print(f"  warning: {message}")
        if not report.ok:
            worst = max(worst, 1)
    return worst
