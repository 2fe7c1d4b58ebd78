"""The Redis broker under Sentinel: its options."""

import time

import pytest

from myapp.brokers.redis import RedisBroker
from myapp.exceptions import BrokerConfigurationError, BrokerUnavailable
from scripts.servers import free_port

# -- options (no server) --------------------------------------------------------

SENTINELS = [["127.0.0.1", 26379]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sentinels": "127.0.0.1:26379"}, "non-empty list of \\[host, port\\] pairs"),
        ({"sentinels": []}, "non-empty list of \\[host, port\\] pairs"),
        ({"sentinels": [["127.0.0.1"]]}, "\\['127.0.0.1'\\] is not one"),
        ({"sentinels": [["127.0.0.1", "26379"]]}, "is not one"),
        ({"sentinels": [["127.0.0.1", True]]}, "is not one"),
        ({"sentinels": [["127.0.0.1", 70000]]}, "is not one"),
        ({"sentinels": [["", 26379]]}, "is not one"),
        ({"sentinels": SENTINELS, "service_name": ""}, "sentinel monitor <name>"),
        ({"sentinels": SENTINELS, "service_name": 7}, "service_name must be a str"),
        ({"sentinels": SENTINELS, "sentinel_kwargs": "secret"}, "sentinel_kwargs must be a dict"),
        ({"sentinels": SENTINELS, "sentinel_kwargs": {"pasword": "x"}}, "sentinel_kwargs do not fit"),
        ({"sentinels": SENTINELS, "url": "unix:///run/redis.sock"}, "Sentinel gives the primary as host and port"),
        ({"sentinels": SENTINELS, "url": "http://x"}, "not a redis-py URL"),
    ],
)
def test_bad_sentinel_options_fail_at_start_up_with_the_fix(options, message):
    """Each malformed Sentinel option raises BrokerConfigurationError saying what to write instead."""
    with pytest.raises(BrokerConfigurationError, match=message):
        RedisBroker(**options)


def test_url_gives_the_primary_its_database_credentials_and_tls():
    """With sentinels, the url's database, username, password and TLS reach the primary; its host is ignored."""
    broker = RedisBroker(url="rediss://app:s3cret@ignored.example:1234/3", sentinels=SENTINELS)
    kwargs = broker._pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (3, "app", "s3cret")
    assert "host" not in kwargs and "port" not in kwargs
    assert broker._pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    plain = RedisBroker(url="redis:///0", sentinels=SENTINELS)
    assert plain._pool.connection_class.__name__ == "SentinelManagedConnection"


def test_without_any_sentinel_answering_calls_fail_fast():
    """The constructor does no I/O; with no Sentinel up, publish and listener raise BrokerUnavailable at once."""
    broker = RedisBroker(url="redis:///0", sentinels=[["127.0.0.1", free_port()]], connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="No master found for 'mymaster'"):
        broker.publish("room:a", "t", "x")
    with pytest.raises(BrokerUnavailable, match="No master found"):
        broker.listener("!hub:test")
    assert time.monotonic() - started < 2
    broker.close()
