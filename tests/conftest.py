"""Shared fixtures: real servers (embedded Valkey and PostgreSQL), brokers, hubs, the live stack.

Servers start from the PyPI wheels unless TEST_REDIS_URL / TEST_DATABASE_URL
point at running ones. In-process tests that use the database run on
PostgreSQL (the same server the PostgreSQL broker needs).
"""

import os
import time
import uuid

import pytest

from scripts.servers import EmbeddedPostgres, EmbeddedValkey, ValkeyCluster
from tests.stack import LiveStack


def wait_until(predicate, timeout=10.0, what="condition", interval=0.01):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory):
    """A Valkey server for the session (or TEST_REDIS_URL): an object with ``.url``."""
    if url := os.environ.get("TEST_REDIS_URL"):
        yield type("External", (), {"url": url})()
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory):
    """A Redis Cluster of 3 Valkey primaries for the session (scripts/servers ``ValkeyCluster``)."""
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A PostgreSQL server for the session: an object with ``.url(dbname)``."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        base = url.rsplit("/", 1)[0]
        yield type("External", (), {"url": staticmethod(lambda dbname="postgres": f"{base}/{dbname}")})()
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(postgres_server):
    """Run the in-process tests' database on PostgreSQL."""
    import dj_database_url
    from django.conf import settings
    from django.db import connections

    config = dj_database_url.parse(postgres_server.url("postgres"), conn_max_age=0)
    default = settings.DATABASES["default"]
    default.clear()
    default.update(config)
    connections.settings = connections.configure_settings(settings.DATABASES)
    connections.close_all()
    del connections["default"]  # the next use builds a PostgreSQL wrapper from the new settings


def _broker_settings(settings, config):
    settings.MYAPP_BROKER = config


@pytest.fixture
def memory_broker(settings):
    """The process's broker switched to the memory backend (fresh state)."""
    from myapp.brokers import get_broker

    _broker_settings(settings, {"BACKEND": "myapp.brokers.memory.MemoryBroker", "OPTIONS": {}})
    return get_broker()


@pytest.fixture
def redis_broker(settings, valkey_server):
    """The process's broker switched to Redis on the test server, with a unique key prefix."""
    from myapp.brokers import get_broker

    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    _broker_settings(
        settings,
        {"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {"url": valkey_server.url, "key_prefix": prefix}},
    )
    return get_broker()


@pytest.fixture
def redis_cluster_broker(settings, valkey_cluster):
    """The process's broker switched to Redis Cluster on the test cluster, with a unique key prefix."""
    from myapp.brokers import get_broker

    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    _broker_settings(
        settings,
        {
            "BACKEND": "myapp.brokers.redis_cluster.RedisClusterBroker",
            "OPTIONS": {"startup_nodes": valkey_cluster.startup_nodes, "key_prefix": prefix},
        },
    )
    return get_broker()


@pytest.fixture
def postgres_broker(settings, transactional_db):
    """The process's broker switched to PostgreSQL (needs committed transactions)."""
    from myapp.brokers import get_broker

    _broker_settings(settings, {"BACKEND": "myapp.brokers.postgres.PostgresBroker", "OPTIONS": {}})
    return get_broker()


BACKENDS = ["memory", "redis", "redis_cluster", "postgres"]


@pytest.fixture(params=BACKENDS)
def broker(request):
    """Each broker backend in turn (the contract suite)."""
    return request.getfixturevalue(f"{request.param}_broker")


@pytest.fixture
def hub_factory():
    """Build started hubs that stop at teardown: ``hub_factory(broker, **options)``."""
    from myapp.hub import Hub

    hubs = []

    def build(broker, **options):
        options.setdefault("heartbeat_interval", 0.5)
        options.setdefault("subscribe_timeout", 5.0)
        hub = Hub(broker, **options).start()
        hubs.append(hub)
        assert hub.available(10), "the hub did not connect"
        return hub

    yield build
    for hub in hubs:
        hub.stop()


@pytest.fixture(autouse=True)
def _fresh_process_hub():
    """No test sees another test's hub or broker."""
    yield
    from myapp import brokers, hub

    hub.reset()
    brokers.reset()


@pytest.fixture(scope="session")
def redis_stack(tmp_path_factory, valkey_server):
    """gunicorn (2 gevent workers) + db_worker on the Redis broker and SQLite."""
    stack = LiveStack(tmp_path_factory.mktemp("stack-redis"), mode="redis", redis_url=valkey_server.url)
    with stack:
        yield stack


@pytest.fixture(scope="session")
def postgres_stack(tmp_path_factory, postgres_server):
    """gunicorn (2 gevent workers) + db_worker on PostgreSQL alone."""
    stack = LiveStack(tmp_path_factory.mktemp("stack-pg"), mode="postgres", postgres=postgres_server)
    with stack:
        yield stack


@pytest.fixture(params=["redis", "postgres"])
def stack(request):
    """The live stack in each mode."""
    return request.getfixturevalue(f"{request.param}_stack")
