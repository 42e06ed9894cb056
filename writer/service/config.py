"""The writer's configuration: TOML file + command-line overrides, checked by a JSON Schema."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import jsonschema

from blissdata.redis_url import masked
from blissdata.schemas import json_path


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and the key."""


@dataclass
class WriterConfig:
    redis_url: str = "redis://127.0.0.1:6379"
    wait_for_redis: bool = True
    sessions: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=lambda: ["native"])
    data_roots: list[str] = field(default_factory=lambda: ["/tmp/blissdata"])
    file_layout: str = "shared"
    max_lag_s: float = 1.0
    memory_budget_mb: float = 512
    disk_reserve_mb: float = 64
    inactivity_timeout_s: float = 600
    lease_ttl_s: float = 5.0
    compression_threads: int = 2
    fill_value_int: int = 0
    compression: dict = field(default_factory=lambda: {"default": "bitshuffle-lz4",
                                                       "scalars": "none"})
    metrics: dict = field(default_factory=lambda: {"enabled": False, "port": 9118,
                                                    "host": "127.0.0.1"})
    log_level: str = "INFO"
    log_json: bool = False
    source: str = "<defaults>"

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_mb * 2**20)

    @property
    def disk_reserve_bytes(self) -> int:
        return int(self.disk_reserve_mb * 2**20)

    def compression_for(self, stream_name: str, scalar: bool = False) -> dict:
        """Compression setting of a stream: per-stream override (first match), else
        ``scalars`` (default "none") for a stream of scalars, else ``default``."""
        level = self.compression.get("level")
        name = self.compression.get("default", "bitshuffle-lz4")
        if scalar:
            name = self.compression.get("scalars", "none")
        for pattern, override in (self.compression.get("streams") or {}).items():
            if fnmatch.fnmatchcase(stream_name, pattern):
                name = override
                break
        setting = {"name": name}
        if level is not None and name not in ("bitshuffle-lz4", "bslz4", "none"):
            setting["level"] = level
        return setting


def _schema() -> dict:
    return json.loads(resources.files("writer.service").joinpath("config_schema.json").read_text())


def load_config(path: str | Path | None = None, **overrides) -> WriterConfig:
    """Read `path` (TOML), apply non-None `overrides`, validate. ConfigError on problems."""
    values: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            values = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    errors = sorted(jsonschema.Draft202012Validator(_schema()).iter_errors(values),
                    key=lambda e: str(e.absolute_path))
    if errors:
        e = errors[0]
        raise ConfigError(f"configuration {source}: {json_path(e.absolute_path)}: "
                          f"{masked(e.message)}")  # a bad redis_url is quoted in it
    config = WriterConfig(**values, source=source)
    from ..hdf5.compression import parse_compression

    for pattern in ["*", *(config.compression.get("streams") or {})]:
        try:
            parse_compression(config.compression_for(pattern))
            parse_compression(config.compression_for(pattern, scalar=True))
        except ValueError as exc:
            raise ConfigError(f"configuration {source}: compression: {exc}") from None
    _check_data_roots(config)
    return config


def _check_data_roots(config: WriterConfig) -> None:
    """Every data root must be an existing folder: a writer started without one would fail
    every scan later. The writer creates folders under a root, never the root itself."""
    for root in config.data_roots:
        path = Path(root)
        if not path.exists():
            problem = "does not exist"
        elif not path.is_dir():
            problem = "is not a folder"
        else:
            continue
        raise ConfigError(f"configuration {config.source}: data root {root} {problem}; "
                          f"create it, or give other roots (data_roots, --data-root)")
