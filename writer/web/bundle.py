"""The built page in `static/` and the sources it was built from in `frontend/`: the hash
that `frontend/build.mjs` records in `static/build-info.json`, computed the same way here, so
a test can tell a bundle older than its sources."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

HERE = Path(__file__).parent
FRONTEND = HERE / "frontend"
STATIC = HERE / "static"
REBUILD = "cd writer/web/frontend && npm ci && npm run build"


def source_files() -> list[str]:
    """The files the bundle is built from, relative to frontend/, sorted (as build.mjs)."""
    files = ["package.json", "package-lock.json", "build.mjs"]
    files += [p.relative_to(FRONTEND).as_posix() for p in (FRONTEND / "src").rglob("*")
              if p.is_file()]
    return sorted(files)


def source_hash() -> str:
    digest = hashlib.sha256()
    for name in source_files():
        digest.update(name.encode() + b"\0" + (FRONTEND / name).read_bytes() + b"\0")
    return digest.hexdigest()


def built_hash() -> str | None:
    """The sources' hash the committed bundle was built from (None: no bundle)."""
    info = STATIC / "build-info.json"
    return json.loads(info.read_text())["source_sha256"] if info.exists() else None
