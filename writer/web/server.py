"""`blisswriter serve`: the HTTP transport. Tornado handlers, each a few lines over
`content.H5Content` (h5grove's endpoints, for h5web), `listing` (scans, folders) and the
built page in `static/`. Read-only: GET only.

Routes, below ``--base-path`` (default ``/``):

    /                         the page (h5web)
    /static/...               its script and styles
    /h5grove/meta|attr|data|stats|paths?file=...&path=...   h5grove's API
    /api/scans                the writer's recent and running scans (JSON)
    /api/files?folder=...     folders and HDF5 files under the data roots (JSON)
    /api/info                 the data roots and limits (JSON)
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from .access import AccessError, DataRoots
from .content import DEFAULT_MAX_SELECTION_MB, H5Content
from .listing import list_folder, read_scans

log = logging.getLogger("blisswriter.web")
STATIC = Path(__file__).parent / "static"


class ApiHandler(tornado.web.RequestHandler):
    """Runs its work in the server's HDF5 thread (h5py serialises calls anyway; the event
    loop stays free for the page's static files); AccessError becomes an HTTP error with a
    JSON message, anything unexpected a 500 with its text. The server keeps serving."""

    def initialize(self, app: "WebApp"):
        self.app = app

    def set_default_headers(self):
        self.set_header("Cache-Control", "no-store")  # a live scan changes between requests

    async def run(self, work, *args, hdf5: bool = True):
        """`work(*args)` in the HDF5 thread (else, `hdf5=False`, in another: a slow Redis
        must not hold up the files)."""
        executor = self.app.executor if hdf5 else None
        try:
            answer = await asyncio.get_running_loop().run_in_executor(executor, work, *args)
        except AccessError as exc:
            self.send_error(exc.status, message=str(exc))
            return
        except Exception as exc:  # noqa: BLE001  a request must not stop the server
            log.exception("%s failed", self.request.uri)
            self.send_error(500, message=f"{type(exc).__name__}: {exc}")
            return
        if isinstance(answer, dict):
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(answer))
            return
        for key, value in answer.headers.items():  # h5grove's Response
            self.set_header(key, value)
        self.finish(answer.content)

    def write_error(self, status_code: int, **kwargs):
        message = kwargs.get("message") or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"message": message, "status": status_code}))

    def arg(self, name: str) -> str | None:
        return self.get_query_argument(name, None, strip=False)


class H5GroveHandler(ApiHandler):
    async def get(self, endpoint: str):
        content, file, path = self.app.content, self.arg("file") or "", self.arg("path")
        if endpoint == "meta":
            await self.run(content.meta, file, path)
        elif endpoint == "attr":
            await self.run(content.attr, file, path,
                           self.get_query_arguments("attr_keys", strip=False))
        elif endpoint == "data":
            flatten = (self.arg("flatten") or "false").lower() not in ("false", "0")
            await self.run(content.data, file, path, self.arg("selection"),
                           self.arg("dtype"), self.arg("format"), flatten)
        elif endpoint == "stats":
            await self.run(content.stats, file, path, self.arg("selection"))
        else:
            await self.run(content.paths, file, path)


class ScansHandler(ApiHandler):
    async def get(self):
        await self.run(read_scans, self.app.redis_client, self.app.roots, hdf5=False)


class FilesHandler(ApiHandler):
    async def get(self):
        await self.run(list_folder, self.app.roots, self.arg("folder"))


class InfoHandler(ApiHandler):
    async def get(self):
        self.finish({"data_roots": [str(r) for r in self.app.roots.roots],
                     "max_selection_mb": self.app.content.max_selection_bytes / 1e6,
                     "redis": self.app.redis_client is not None})


class PageHandler(tornado.web.RequestHandler):
    def get(self):
        self.set_header("Cache-Control", "no-cache")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((STATIC / "index.html").read_bytes())


class WebApp:
    """The server's state: data roots, the HDF5 reader, the Redis client (None: no scan
    list), and the tornado application mounted at `base_path`."""

    def __init__(self, data_roots, redis_url: str | None = None, base_path: str = "/",
                 max_selection_mb: float = DEFAULT_MAX_SELECTION_MB):
        self.roots = DataRoots(data_roots)
        self.content = H5Content(self.roots, max_selection_mb)
        self.redis_client = None
        if redis_url:
            from blissdata.store import client_from_url

            self.redis_client = client_from_url(redis_url, socket_connect_timeout=2,
                                                socket_timeout=5)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="h5")
        self.base_path = normalize_base_path(base_path)
        base, args = self.base_path.rstrip("/"), {"app": self}
        self.application = tornado.web.Application([
            (rf"{base}/", PageHandler),
            (rf"{base}/h5grove/(meta|attr|data|stats|paths)/?", H5GroveHandler, args),
            (rf"{base}/api/scans", ScansHandler, args),
            (rf"{base}/api/files", FilesHandler, args),
            (rf"{base}/api/info", InfoHandler, args),
            (rf"{base}/static/(.*)", tornado.web.StaticFileHandler, {"path": str(STATIC)}),
        ] + ([(rf"{base}", tornado.web.RedirectHandler, {"url": f"{base}/"})] if base else []))


def normalize_base_path(base_path: str) -> str:
    """'/' or '/prefix/' (the path a reverse proxy forwards without stripping it)."""
    parts = [p for p in (base_path or "/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"--base-path {base_path!r}: no '.' or '..' parts")
    return "/" + "".join(f"{p}/" for p in parts)


DEFAULT_PORT = 8765
PORTS_TRIED = 10  # without --port: 8765, else the next free one up to 8774 (like Jupyter)


def listen(host: str, port: int | None) -> list:
    """The listening sockets: on `port` (0: any free one), or, None, on the first free port
    from DEFAULT_PORT (another server, e.g. a second viewer, may hold it)."""
    if port is not None:
        return bind_sockets(port, host)
    for candidate in range(DEFAULT_PORT, DEFAULT_PORT + PORTS_TRIED):
        try:
            return bind_sockets(candidate, host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(f"ports {DEFAULT_PORT}-{DEFAULT_PORT + PORTS_TRIED - 1} are all in use on "
                  f"{host}: choose one with --port")


def serve(data_roots, host: str = "127.0.0.1", port: int | None = None,
          redis_url: str | None = None, base_path: str = "/",
          max_selection_mb: float = DEFAULT_MAX_SELECTION_MB, on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM. `on_ready(url)` once listening."""
    app = WebApp(data_roots, redis_url, base_path, max_selection_mb)

    async def main():
        sockets = listen(host, port)
        server = HTTPServer(app.application, xheaders=True)  # X-Forwarded-* behind a proxy
        server.add_sockets(sockets)
        bound = sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        url = f"http://{shown}:{bound}{app.base_path}"
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        server.stop()

    try:
        asyncio.run(main())
    finally:
        app.executor.shutdown(wait=False, cancel_futures=True)
