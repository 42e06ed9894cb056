"""A scan's `mapping` (its future NeXus layout) -> a checked, flat Layout the writer follows.

The mapping is validated against `blissdata/schemas/mapping.json` first (compiled with
fastjsonschema: a 10,000-node mapping checks in ~0.2 s; on failure jsonschema explains), then
for meaning: a STREAM names a stream of the scan, a SOFT_LINK points at a node of the mapping.
Every error names the mapping path, e.g. ``mapping /instrument/diode/data: ...``.
Paths in a Layout are entry-relative: "/" is the NXentry.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import fastjsonschema
import jsonschema

from blissdata.schemas import load_schema

KINDS = ("RAW", "STREAM", "SOFT_LINK", "EXTERNAL_LINK")


class MappingError(ValueError):
    """The mapping is not valid; the message names the mapping path."""


@dataclass
class Group:
    path: str
    attrs: dict


@dataclass
class Raw:
    path: str
    attrs: dict
    value: object


@dataclass
class StreamLeaf:
    path: str
    attrs: dict
    stream: str


@dataclass
class SoftLink:
    path: str
    attrs: dict
    target: str  # entry-relative


@dataclass
class ExternalLink:
    path: str
    attrs: dict
    file: str  # absolute, or relative to the scan file's folder
    target: str  # path inside that file


@dataclass
class DefaultPlot:
    """The NXdata to show by default. `create`: the writer makes group `path` with soft links
    `fields` (name -> entry-relative target); otherwise the mapping has the group."""
    path: str
    signal: str
    axes: list = field(default_factory=list)  # field names, one per leading dimension
    fields: dict = field(default_factory=dict)
    create: bool = False


@dataclass
class Layout:
    entry_attrs: dict
    groups: list = field(default_factory=list)  # parents before children
    raws: list = field(default_factory=list)
    streams: list = field(default_factory=list)
    soft_links: list = field(default_factory=list)
    external_links: list = field(default_factory=list)
    default_plot: DefaultPlot | None = None

    def stream_paths(self, stream: str) -> list[str]:
        return [s.path for s in self.streams if s.stream == stream]

    def node_paths(self) -> list[str]:
        """Every group and leaf of the mapping, entry-relative, parents first."""
        return [n.path for kind in (self.groups, self.raws, self.streams, self.soft_links,
                                    self.external_links) for n in kind]


@functools.lru_cache(maxsize=None)
def _fast_validator():
    return fastjsonschema.compile(load_schema("mapping.json"))


def validate_mapping(mapping) -> None:
    """MappingError naming the mapping path if `mapping` does not match the JSON Schema."""
    try:
        _fast_validator()(mapping)
        return
    except fastjsonschema.JsonSchemaException:
        pass
    schema = load_schema("mapping.json")
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft7Validator(schema).iter_errors(mapping))
    if error is None:  # the two validators disagree: trust the explaining one
        return
    raise MappingError(f"mapping {_mapping_path(error.absolute_path)}: {error.message}")


def _mapping_path(json_path) -> str:
    """[1, 'instrument', 1, 'diode', 2] -> '/instrument/diode (value)'."""
    names, suffix, parts = [], "", list(json_path)
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i] == 1 and isinstance(parts[i + 1], str):
            names.append(parts[i + 1])
            i += 2
            continue
        rest = parts[i:]
        what = {0: "attrs", 1: "kind or children", 2: "value"}.get(rest[0], str(rest[0]))
        suffix = f" ({what}{''.join(f'.{p}' for p in rest[1:])})"
        break
    return "/" + "/".join(names) + suffix


def parse_mapping(mapping, stream_names=None, plottable=None) -> Layout:
    """Check `mapping` and flatten it. `stream_names`: the scan's streams, when known;
    `plottable`: those an inferred default plot may show (numbers; default: all)."""
    validate_mapping(mapping)
    entry_attrs, children = mapping
    layout = Layout(dict(entry_attrs))
    classes = {"/": entry_attrs.get("NX_class")}
    _walk(children, "", layout, classes)
    nodes = {"/"} | {g.path for g in layout.groups} | {
        n.path for kind in (layout.raws, layout.streams, layout.soft_links,
                            layout.external_links) for n in kind}
    if stream_names is not None:
        for leaf in layout.streams:
            if leaf.stream not in stream_names:
                raise MappingError(
                    f"mapping {leaf.path}: STREAM {leaf.stream!r} is not a stream of this scan "
                    f"(it has {sorted(stream_names)[:20]})")
    for link in layout.soft_links:
        if link.target not in nodes:
            raise MappingError(f"mapping {link.path}: SOFT_LINK target {link.target!r} is not "
                               f"a node of the mapping")
    layout.default_plot = _default_plot(layout, classes, plottable)
    return layout


def _walk(children: dict, parent: str, layout: Layout, classes: dict) -> None:
    for name, node in children.items():
        path = f"{parent}/{name}"
        attrs = node[0]
        if len(node) == 2:
            layout.groups.append(Group(path, dict(attrs)))
            classes[path] = attrs.get("NX_class")
            _walk(node[1], path, layout, classes)
            continue
        kind, value = node[1], node[2]
        if kind == "RAW":
            layout.raws.append(Raw(path, dict(attrs), value))
        elif kind == "STREAM":
            layout.streams.append(StreamLeaf(path, dict(attrs), value))
        elif kind == "SOFT_LINK":
            layout.soft_links.append(SoftLink(path, dict(attrs), value))
        else:
            layout.external_links.append(ExternalLink(path, dict(attrs), value["file"],
                                                      value["path"]))


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _field_name(path: str) -> str:
    """/instrument/diode/data -> diode ; /measurement/epoch -> epoch."""
    parent, name = path.rsplit("/", 1)
    if name in ("data", "value") and parent:
        return parent.rsplit("/", 1)[1]
    return name


def _default_plot(layout: Layout, classes: dict, plottable=None) -> DefaultPlot | None:
    """The mapping's NXdata if it has one, else one inferred from detectors and positioners:
    signal = the first STREAM under an NXdetector (else the first STREAM not under an
    NXpositioner), axes = the first STREAM under an NXpositioner."""
    nxdata = [g for g in layout.groups if g.attrs.get("NX_class") == "NXdata"]
    if nxdata:
        group = min(nxdata, key=lambda g: g.path.count("/"))  # the shallowest
        signal = group.attrs.get("signal")
        members = [n.path.rsplit("/", 1)[1] for kind in (layout.raws, layout.streams,
                   layout.soft_links) for n in kind if _parent(n.path) == group.path]
        if signal is None:
            if not members:
                return None
            signal = members[0]
        axes = group.attrs.get("axes", [])
        return DefaultPlot(group.path, signal, list(axes) if isinstance(axes, list) else [axes])
    streams = [s for s in layout.streams if plottable is None or s.stream in plottable]
    detectors = [s for s in streams if classes.get(_parent(s.path)) == "NXdetector"]
    positioners = [s for s in streams if classes.get(_parent(s.path)) == "NXpositioner"]
    others = [s for s in streams if s not in positioners]
    signal = (detectors or others or [None])[0]
    if signal is None:
        return None
    name = _field_name(signal.path)
    fields = {name: signal.path}
    axes = []
    if positioners:
        axis = _field_name(positioners[0].path)
        if axis == name:
            axis += "_axis"
        fields[axis] = positioners[0].path
        axes = [axis]
    path = "/plot"
    while path in {g.path for g in layout.groups}:
        path += "_"
    return DefaultPlot(path, name, axes, fields, create=True)
