"""Answers to h5web's requests (h5grove's `/meta`, `/attr`, `/data`, `/stats`, `/paths`),
built with h5grove's content classes and encoders, with this server's rules on top: files
opened by `access.open_h5` (each request anew: a growing scan shows its new points), links
and virtual-dataset sources checked against the data roots, selections capped in size.

Knows nothing of HTTP: errors are `AccessError(status, message)`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import h5py
from h5grove.content import DatasetContent, GroupContent, ResolvedEntityContent, create_content
from h5grove.encoders import Response, encode
from h5grove.models import LinkResolution
from h5grove.utils import NotFoundError, QueryArgumentError, parse_slice, sorted_dict

from .access import AccessError, DataRoots, check_virtual_sources, follow_links, open_h5

DEFAULT_MAX_SELECTION_MB = 64.0  # h5web asks for what it shows: a frame, a line, a slice
FORMATS = ("json", "bin", "csv", "npy", "tiff")


def selection_shape(shape: tuple, selection: str | None) -> tuple:
    """The shape `dataset[selection]` would have (h5grove's selection syntax: "0,:,10:20"),
    without reading it. AccessError 422 on a selection that does not fit the shape."""
    if selection is None:
        return shape
    try:
        members = parse_slice(selection)
    except (ValueError, TypeError):
        raise AccessError(422, f"selection {selection!r} is not a slice such as '0,:,10:20'")
    if len(members) > len(shape):
        raise AccessError(422, f"selection {selection!r} has {len(members)} members for a "
                               f"{len(shape)}D dataset of shape {shape}")
    out = []
    for axis, (member, size) in enumerate(zip(members, shape)):
        if isinstance(member, int):
            if not -size <= member < size:
                raise AccessError(422, f"selection {selection!r}: index {member} out of range "
                                       f"on axis {axis} (size {size})")
            continue
        if member.step is not None and member.step <= 0:
            raise AccessError(422, f"selection {selection!r}: step must be positive")
        out.append(len(range(*member.indices(size))))
    return tuple(out) + tuple(shape[len(members):])


class H5Content:
    """h5grove's answers for the files under `roots`."""

    def __init__(self, roots: DataRoots, max_selection_mb: float = DEFAULT_MAX_SELECTION_MB):
        self.roots = roots
        self.max_selection_bytes = int(max_selection_mb * 1e6)

    @contextlib.contextmanager
    def entity(self, file: str, path: str | None) -> Iterator[tuple]:
        """(h5grove's content, the h5py object) of `path` in `file`, once every check
        passed; the h5py object is None for a link that does not resolve."""
        path = path or "/"
        if not path.startswith("/"):
            raise AccessError(422, f"path {path!r} must start with '/'")
        real = self.roots.resolve(file)
        with contextlib.ExitStack() as opened:
            try:
                h5file = opened.enter_context(open_h5(real))
            except OSError as exc:
                raise AccessError(422, f"{file} cannot be opened as HDF5: {exc}") from None
            where, local = follow_links(self.roots, h5file, path, opened)
            try:
                content = create_content(where, local, LinkResolution.ONLY_VALID)
                h5obj = where[local] if isinstance(content, ResolvedEntityContent) else None
                if isinstance(h5obj, h5py.Dataset) and where.swmr_mode:
                    h5obj.refresh()  # the length flushed by now
                yield content, h5obj
            except NotFoundError as exc:
                raise AccessError(404, str(exc)) from None
            except (QueryArgumentError, ValueError, IndexError, TypeError) as exc:
                raise AccessError(422, f"{path} in {file}: {exc}") from None
            except KeyError as exc:
                raise AccessError(404, f"{path} in {file}: {exc}") from None

    def meta(self, file: str, path: str | None) -> Response:
        with self.entity(file, path) as (content, h5obj):
            if isinstance(content, GroupContent):
                found = self._group_metadata(content, h5obj)
            else:
                found = content.metadata()
            found["name"] = (path or "/").rstrip("/").split("/")[-1]  # as asked, not as linked
            return encode(found)

    def _group_metadata(self, content: GroupContent, group: h5py.Group) -> dict:
        """A group and its children, like h5grove's, except that external links are
        followed by `follow_links` (a child leading outside the roots is shown as the link
        itself, never followed)."""
        children = []
        for name in group.keys():
            child = content.path.rstrip("/") + "/" + name
            with contextlib.ExitStack() as opened:
                try:
                    where, local = follow_links(self.roots, group.file, child, opened)
                    found = create_content(where, local, LinkResolution.ONLY_VALID).metadata(0)
                except (AccessError, NotFoundError, OSError, KeyError):
                    found = create_content(group.file, child, LinkResolution.NONE).metadata()
            found["name"] = name
            children.append(found)
        return sorted_dict(("children", children), *content.metadata(0).items())

    def attr(self, file: str, path: str | None, keys: list[str]) -> Response:
        with self.entity(file, path) as (content, h5obj):
            if h5obj is None:
                raise AccessError(404, f"{content.path} is an unresolved link: no attributes")
            missing = [k for k in keys if k not in h5obj.attrs]
            if missing:
                raise AccessError(404, f"{content.path} has no attribute {missing[0]!r}")
            return encode(content.attributes(keys or None))

    def data(self, file: str, path: str | None, selection: str | None = None,
             dtype: str | None = None, fmt: str | None = None, flatten: bool = False
             ) -> Response:
        if fmt not in (None, *FORMATS):
            raise AccessError(422, f"format {fmt!r} unknown (one of {', '.join(FORMATS)})")
        if dtype not in (None, "origin", "safe"):
            raise AccessError(422, f"dtype {dtype!r} unknown (origin or safe)")
        with self.entity(file, path) as (content, h5obj):
            self._check_readable(content, h5obj, selection)
            try:
                return encode(content.data(selection, flatten, dtype or "origin"), fmt)
            except (QueryArgumentError, ValueError, TypeError, IndexError) as exc:
                raise AccessError(422, f"{content.path}: {exc}") from None

    def stats(self, file: str, path: str | None, selection: str | None = None) -> Response:
        with self.entity(file, path) as (content, h5obj):
            self._check_readable(content, h5obj, selection)
            try:
                return encode(content.data_stats(selection))
            except (ValueError, TypeError, IndexError) as exc:
                raise AccessError(422, f"{content.path}: {exc}") from None

    def paths(self, file: str, path: str | None) -> Response:
        """Every path below `path` in the file (h5web's search), links not followed."""
        with self.entity(file, path) as (content, h5obj):
            if not isinstance(content, GroupContent):
                raise AccessError(422, f"{content.path} is not a group")
            base = content.path.rstrip("/")
            found = [content.path]
            h5obj.id.links.visit(lambda name: found.append(
                f"{base}/{name.decode()}") and None)
            return encode(found)

    def _check_readable(self, content, dataset, selection: str | None) -> None:
        """A dataset, its sources inside the roots, the selection within the size cap."""
        if not isinstance(content, DatasetContent):
            raise AccessError(422, f"{content.path} is not a dataset")
        check_virtual_sources(self.roots, dataset)
        shape = selection_shape(dataset.shape or (), selection)
        nbytes = math.prod(shape) * dataset.dtype.itemsize
        if nbytes > self.max_selection_bytes:
            raise AccessError(413, f"{content.path}: selection of shape {shape} is "
                                   f"{nbytes / 1e6:.1f} MB, over the server's limit of "
                                   f"{self.max_selection_bytes / 1e6:.1f} MB "
                                   f"(--max-selection-mb): ask for a slice")

