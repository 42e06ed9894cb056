"""JSON Schemas of the protocol: scan_info.json (checked at prepare), mapping.json."""

from __future__ import annotations

import functools
import json
from importlib import resources

import jsonschema

from ..exceptions import SchemaError


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """A schema of this package by file name, e.g. "scan_info.json"."""
    return json.loads(resources.files(__package__).joinpath(name).read_text())


@functools.lru_cache(maxsize=None)
def _validator(name: str):
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def json_path(path) -> str:
    """jsonschema's deque path -> "$.channels.diode.unit" style."""
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_scan_info(info: dict, where: str = "scan") -> None:
    """SchemaError naming the JSON path of the first problem, if `info` is not valid."""
    errors = sorted(_validator("scan_info.json").iter_errors(info),
                    key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        e = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise SchemaError(f"{where}: info {json_path(e.absolute_path)}: {e.message}{more}")
