"""``info["h5maps"]``: parsing the tree a blissdata 2 scan describes, planning its
layout, and writing its static parts."""

from __future__ import annotations

import base64
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import h5py
import numpy as np

from .protocol import BLISSDATA_VERSION, Bliss2Error


_DTYPE = re.compile(r"^(bool|(int|uint)(8|16|32|64)|float(16|32|64|128)|complex(64|128|256))$")
_BINARY_DTYPE = re.compile(r"^(\|?[iub]1|[><]([iuf][248]|[fc](8|16)|c32))$")
H5_TYPES = ("group", "dataset", "external_binary_dataset", "soft_link", "external_link",
            "virtual_dataset")


@dataclass
class Node:
    """One h5map node: kind is group, static, stream, soft_link, external_link or
    external_binary; raw is its JSON (to tell what changed at the end of the scan)."""
    kind: str
    path: str
    raw: object
    attrs: dict = field(default_factory=dict)
    children: dict = field(default_factory=dict)
    value: object = None  # static: the array to write; stream: the stream name; links: target


def _vlen_strings(array: np.ndarray):
    """Strings as blissdata's InlineRaw.decode() gives them to h5py: variable length."""
    return np.vectorize(lambda x: x.encode(),
                        otypes=[np.dtype("O", metadata={"vlen": str})])(array)


def _raw_value(value, where: str):
    """blissdata.h5map.InlineRaw: JSON scalars/lists -> int64, float64, bool or str."""
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise Bliss2Error(f"{where}: value is not a regular array: {exc}") from None
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise Bliss2Error(f"{where}: non-finite values need an 'inline' item")
        return array.astype(np.float64)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind == "U":
        return _vlen_strings(array)
    raise Bliss2Error(f"{where}: value {value!r:.60} is not numbers, booleans or strings")


def decode_item(item, where: str):
    """A blissdata.h5map data item (not a stream) -> what h5py writes, as blisswriter."""
    kind = item.get("type") if isinstance(item, dict) else None
    if not isinstance(item, dict):
        if item is None:
            raise Bliss2Error(f"{where}: null is not a value")
        return _raw_value(item, where)
    try:
        if kind == "inline":
            if not _DTYPE.match(str(item["dtype"])):
                raise Bliss2Error(f"{where}: inline dtype {item['dtype']!r} is not a number type")
            return np.array(item["value"], dtype=item["dtype"])
        if kind == "inline_b64":
            if not _BINARY_DTYPE.match(str(item["dtype"])):
                raise Bliss2Error(f"{where}: inline_b64 dtype {item['dtype']!r} not accepted")
            value = np.frombuffer(base64.b64decode(item["value"]), dtype=item["dtype"])
            return value.reshape(item["shape"]) if item.get("shape") is not None else value
        if kind == "compound":
            columns = [(name, decode_item(col, f"{where}[{name}]"))
                       for name, col in item["columns"]]
            return np.rec.fromarrays([c for _, c in columns],
                                     names=[n for n, _ in columns]).view(np.ndarray)
    except (KeyError, TypeError, ValueError) as exc:
        raise Bliss2Error(f"{where}: {kind} item {json.dumps(item)[:80]} is malformed: "
                          f"{type(exc).__name__}: {exc}") from None
    raise Bliss2Error(f"{where}: data item type {kind!r} is not one blissdata "
                      f"{BLISSDATA_VERSION} defines (inline, inline_b64, compound, stream, "
                      "or a JSON value)")


def _attrs(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Bliss2Error(f"{where}: attributes must be a JSON object")
    return {k: decode_item(v, f"{where}@{k}") for k, v in raw.items()}


def parse_node(raw, path: str = "/") -> Node:
    """Check and decode an h5map node (and below); Bliss2Error names the path."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "group":
        children = raw.get("children") or {}
        if not isinstance(children, dict):
            raise Bliss2Error(f"{path}: group children must be a JSON object")
        node = Node("group", path, raw, _attrs(raw.get("attributes"), path))
        for name, child in children.items():
            if not name or "/" in name:
                raise Bliss2Error(f"{path}: child name {name!r} is not an HDF5 name")
            node.children[name] = parse_node(child, str(PurePosixPath(path) / name))
        return node
    if kind in ("soft_link", "external_link"):
        try:
            target = (raw["target_path"] if kind == "soft_link"
                      else (raw["target_file"], raw["target_path"]))
        except KeyError as exc:
            raise Bliss2Error(f"{path}: {kind} without {exc}") from None
        return Node(kind, path, raw, value=target)
    if kind == "external_binary_dataset":
        try:
            files = [(f["name"], int(f["offset"]),
                      h5py.h5f.UNLIMITED if f.get("size") is None else int(f["size"]))
                     for f in raw["files"]]
            value = (np.dtype(raw["dtype"]), tuple(raw["shape"]), files)
        except (KeyError, TypeError, ValueError) as exc:
            raise Bliss2Error(f"{path}: external_binary_dataset malformed: {exc}") from None
        return Node(kind, path, raw, _attrs(raw.get("attributes"), path), value=value)
    if kind == "virtual_dataset":
        raise Bliss2Error(f"{path}: virtual_dataset nodes are not written by this writer "
                          "version (blisswriter 3.0.0 skips them too)")
    # a dataset: {"type": "dataset", "attributes", "value"}, {"attributes", "value"}, or
    # its value alone (a JSON value or a data item)
    if isinstance(raw, dict) and kind in (None, "dataset"):
        if "value" not in raw:
            raise Bliss2Error(f"{path}: dataset without a value")
        attrs, value = _attrs(raw.get("attributes"), path), raw["value"]
    else:
        attrs, value = {}, raw
    if isinstance(value, dict) and value.get("type") == "stream":
        if not isinstance(value.get("stream"), str):
            raise Bliss2Error(f"{path}: stream item without a stream name")
        return Node("stream", path, raw, attrs, value=value["stream"])
    if isinstance(value, dict) and value.get("type") in H5_TYPES:
        raise Bliss2Error(f"{path}: a {value['type']} cannot be a dataset's value")
    if isinstance(value, dict) and value.get("type") not in (
            None, "inline", "inline_b64", "compound"):
        raise Bliss2Error(f"{path}: node type {value.get('type')!r} is not one blissdata "
                          f"{BLISSDATA_VERSION} defines ({', '.join(H5_TYPES)})")
    return Node("static", path, raw, attrs, value=decode_item(value, path))


def iter_nodes(node: Node):
    yield node
    for child in node.children.values():
        yield from iter_nodes(child)


@dataclass
class StreamNode:
    """Where a stream goes (what scan_writer's layout.streams holds)."""
    stream: str
    path: str
    attrs: dict


@dataclass
class H5MapLayout:
    file: str
    root: Node
    entry_name: str
    streams: list
    others: dict = field(default_factory=dict)  # other files: path -> root (static only)
    external_links: list = field(default_factory=list)


def _parse_root(file: str, raw) -> Node:
    if not isinstance(raw, dict) or raw.get("type", "group") != "group":
        raise Bliss2Error(f"h5maps[{file}]: the root must be a group")
    try:
        return parse_node({**raw, "type": "group"})
    except Bliss2Error as exc:
        raise Bliss2Error(f"h5maps[{file}] {exc}") from None


def plan(info: dict, stream_names: set, scan_path: str | None = None) -> H5MapLayout:
    """The layout of a scan from ``info["h5maps"]``; Bliss2Error names what is wrong.

    The scan's own file (its identity's path if h5maps names it, else the file with the
    streams, else the first) gets the streams; other files (master files linking to it, say)
    hold static nodes and links only."""
    h5maps = info.get("h5maps")
    if not isinstance(h5maps, dict) or not h5maps:
        raise Bliss2Error("info has no h5maps")
    roots = {file: _parse_root(file, raw) for file, raw in h5maps.items()}
    with_streams = [f for f, r in roots.items()
                    if any(n.kind == "stream" for n in iter_nodes(r))]
    if scan_path in roots:
        file = scan_path
    elif with_streams:
        file = with_streams[0]
    else:
        file = next(iter(roots))
    for other in with_streams:
        if other != file:
            node = next(n for n in iter_nodes(roots[other]) if n.kind == "stream")
            raise Bliss2Error(f"h5maps[{other}] {node.path}: streams are written to the "
                              f"scan's own file ({file}) only by this writer version")
    root = roots.pop(file)
    groups = [n for n, c in root.children.items() if c.kind == "group"]
    if not groups:
        raise Bliss2Error(f"h5maps[{file}]: no top-level group to hold the scan")
    streams = []
    for node in iter_nodes(root):
        if node.kind == "stream":
            if node.value not in stream_names:
                raise Bliss2Error(f"h5maps[{file}] {node.path}: stream {node.value!r} is not "
                                  f"a stream of the scan")
            streams.append(StreamNode(node.value, node.path, node.attrs))
    return H5MapLayout(file, root, groups[0], streams, others=roots)


def write_static(parent: h5py.Group, name: str, node: Node, check_file) -> None:
    """Write a node and what is below it, streams aside (json_h5_utils.save_h5_item)."""
    if node.kind == "group":
        group = parent.require_group(name) if name else parent
        group.attrs.update(node.attrs)
        for child_name, child in node.children.items():
            write_static(group, child_name, child, check_file)
    elif node.kind == "static":
        dset = parent.create_dataset(name, data=node.value)
        dset.attrs.update(node.attrs)
    elif node.kind == "soft_link":
        parent[name] = h5py.SoftLink(node.value)
    elif node.kind == "external_link":
        check_file(node.value[0])
        parent[name] = h5py.ExternalLink(*node.value)
    elif node.kind == "external_binary":
        dtype, shape, files = node.value
        for f in files:
            check_file(f[0])
        dset = parent.create_dataset(name, shape=shape, dtype=dtype, external=files)
        dset.attrs.update(node.attrs)


def write_missing(parent: h5py.Group, name: str, node: Node, check_file) -> None:
    """write_static, keeping what the file has already (a master file holds the entries of
    other scans; a resumed scan wrote its part before)."""
    if node.kind == "group":
        group = parent.require_group(name) if name else parent
        group.attrs.update(node.attrs)
        for child_name, child in node.children.items():
            write_missing(group, child_name, child, check_file)
    elif name not in parent:
        write_static(parent, name, node, check_file)


def stamp_root(h5: h5py.File) -> None:
    """The root attributes blisswriter 3.0.0 sets (not part of the h5map)."""
    now = datetime.datetime.now().astimezone().isoformat()
    for key, value in (("HDF5_Version", h5py.version.hdf5_version),
                       ("h5py_version", h5py.version.version), ("file_time", now)):
        if key not in h5.attrs:
            h5.attrs[key] = value
    h5.attrs["file_update_time"] = now


def apply_final(h5: h5py.File, before: Node, after: Node, check_file, warn) -> None:
    """The h5map as it is at CLOSED: what appeared is written, what went away is removed,
    what changed is rewritten; stream datasets keep their place (their attributes follow)."""
    def walk(old: Node | None, new: Node | None, path: str):
        if old is not None and new is not None and old.raw == new.raw:
            return
        parent_path, name = path.rsplit("/", 1) if path != "/" else ("", "")
        parent = h5[parent_path or "/"]
        if new is not None and new.kind == "stream" or old is not None and old.kind == "stream":
            if old is None or new is None or old.kind != new.kind or old.value != new.value:
                warn(f"{path}: a stream's place cannot change at the end of the scan; kept")
            elif path in h5:
                h5[path].attrs.update(new.attrs)
            return
        if new is None:
            if name in parent:
                del parent[name]
            return
        if old is not None and old.kind == new.kind == "group":
            group = h5[path]
            for key in set(old.attrs) - set(new.attrs):
                if key in group.attrs:
                    del group.attrs[key]
            group.attrs.update(new.attrs)
            for child in set(old.children) | set(new.children):
                walk(old.children.get(child), new.children.get(child),
                     f"{path.rstrip('/')}/{child}")
            return
        if name and name in parent:
            del parent[name]
        write_static(parent, name, new, check_file)

    walk(before, after, "/")
