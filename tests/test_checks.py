"""Configuration errors fail at start-up with the fix in the message; system checks flag mistakes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from myapp import checks
from myapp.brokers import load_broker, postgres
from myapp.exceptions import BrokerConfigurationError
from tests.stack import free_port

BASE = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"BACKEND": "myapp.brokers.nope.Broker"}, "cannot be imported"),
        ({"BACKEND": "myapp.events.Event"}, "is not a subclass of myapp.brokers.base.Broker"),
        ({"BACKEND": "myapp.brokers.memory.MemoryBroker", "OPTIONS": {"hostt": 1}}, "OPTIONS do not fit MemoryBroker"),
        ({"BACKEND": "myapp.brokers.memory.MemoryBroker", "OPTIONS": {"history_length": 0}}, "history_length must be"),
        ({"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {"url": "http://x"}}, "is not a redis-py URL"),
        ({"BACKEND": "myapp.brokers.redis.RedisBroker", "OPTIONS": {"socket_timeout": 0}}, "socket_timeout must be"),
        ({"BACKEND": "myapp.brokers.postgres.PostgresBroker", "OPTIONS": {"connect_timeout": 1}}, "connect_timeout"),
        ({"OPTIONS": {}}, "MYAPP_BROKER must be a dict like"),
        ({"BACKEND": "myapp.brokers.memory.MemoryBroker", "OPTION": {}}, "unknown keys"),
    ],
    ids=[
        "bad path",
        "not a broker",
        "unknown option",
        "bad length",
        "bad url",
        "bad timeout",
        "bad pg timeout",
        "no backend",
        "typo key",
    ],
)
def test_bad_broker_config_raises_improperly_configured(config, message):
    """Each bad MYAPP_BROKER raises BrokerConfigurationError (an ImproperlyConfigured) saying what to fix."""
    with pytest.raises(BrokerConfigurationError, match=message) as raised:
        load_broker(config)
    assert isinstance(raised.value, ImproperlyConfigured)


def test_memory_broker_with_several_workers_is_an_error(settings, monkeypatch):
    """Outside gunicorn, the memory broker is flagged when WEB_CONCURRENCY starts more than one worker."""
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.memory.MemoryBroker"}
    monkeypatch.setattr(checks, "server_workers", None)
    monkeypatch.setenv("WEB_CONCURRENCY", "2")
    (error,) = checks.check_broker()
    assert error.id == "myapp.E002" and "WEB_CONCURRENCY=2" in error.msg and "gunicorn -w 1" in error.hint
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    assert checks.check_broker() == []
    monkeypatch.delenv("WEB_CONCURRENCY")
    assert checks.check_broker() == [], "runserver and manage.py commands are one process"


def test_gunicorns_real_worker_count_wins_over_the_environment(settings, monkeypatch):
    """Inside gunicorn the check counts the workers gunicorn started, whatever WEB_CONCURRENCY says."""
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.memory.MemoryBroker"}
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    monkeypatch.setattr(checks, "server_workers", 3)
    (error,) = checks.check_broker()
    assert error.id == "myapp.E002" and "gunicorn runs 3 workers" in error.msg
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    monkeypatch.setattr(checks, "server_workers", 1)
    assert checks.check_broker() == []


class FakeConnections:
    def __init__(self, vendor):
        self.settings = {"default": {}}
        self.vendor = vendor

    def __getitem__(self, alias):
        return type("Connection", (), {"vendor": self.vendor})()


@pytest.mark.parametrize(
    ("vendor", "database", "expected"),
    [
        ("sqlite", "default", ["myapp.E004"]),
        ("postgresql", "missing", ["myapp.E003"]),
        ("postgresql", "default", []),
    ],
)
def test_postgres_broker_needs_a_postgres_database(settings, monkeypatch, vendor, database, expected):
    """The PostgreSQL broker is flagged without a PostgreSQL database behind its alias."""
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.postgres.PostgresBroker", "OPTIONS": {"database": database}}
    monkeypatch.setattr(postgres, "connections", FakeConnections(vendor))
    assert [error.id for error in checks.check_broker()] == expected


def test_postgres_broker_without_its_app_says_what_to_add(settings, monkeypatch):
    """The PostgreSQL broker without "myapp.brokers.postgres" installed is myapp.E009, naming the app to add."""
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.postgres.PostgresBroker"}
    monkeypatch.setattr(postgres, "connections", FakeConnections("postgresql"))
    assert checks.check_broker() == [], "the test settings install the app"
    from django.apps import apps

    monkeypatch.setattr(apps, "is_installed", lambda name: False)
    (error,) = checks.check_broker()
    assert error.id == "myapp.E009"
    assert error.hint == 'Add "myapp.brokers.postgres" to INSTALLED_APPS, then run "python manage.py migrate".'
    settings.MYAPP_BROKER = {"BACKEND": "myapp.brokers.redis.RedisBroker"}
    assert checks.check_broker() == [], "other brokers need no app"


def test_settings_checks(settings):
    """A wildcard CORS origin, a bad authorizer path and a too-long heartbeat are flagged."""
    settings.MYAPP_CORS_ALLOWED_ORIGINS = ["*"]
    settings.MYAPP_CHANNEL_AUTHORIZER = "nowhere.authorize"
    settings.MYAPP_HEARTBEAT_SECONDS = 60
    settings.MYAPP_PUBLISH_TOKENS = ["short"]
    assert sorted(error.id for error in checks.check_settings()) == [
        "myapp.E005",
        "myapp.E008",
        "myapp.W001",
        "myapp.W002",
    ]


def test_metrics_checks(settings, monkeypatch):
    """A malformed or short metrics token, prometheus-client missing, or workers it cannot add up are flagged."""
    settings.MYAPP_METRICS_TOKEN = None
    assert checks.check_metrics() == [], "metrics off: nothing to check"
    for bad in ("", " padded-token-0123456789 ", b"bytes-token-0123456789"):
        settings.MYAPP_METRICS_TOKEN = bad
        assert [error.id for error in checks.check_metrics()] == ["myapp.E010"]
    settings.MYAPP_METRICS_TOKEN = "short"
    assert [error.id for error in checks.check_metrics()] == ["myapp.W003"]
    settings.MYAPP_METRICS_TOKEN = "a-long-enough-metrics-token"
    monkeypatch.setattr(checks, "server_workers", 2)
    (error,) = checks.check_metrics()
    assert error.id == "myapp.E012" and "PROMETHEUS_MULTIPROC_DIR" in error.hint, "the tests run single-process"
    monkeypatch.setattr(checks, "server_workers", 1)
    assert checks.check_metrics() == []
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    (error,) = checks.check_metrics()
    assert error.id == "myapp.E011" and "myapp-push[metrics]" in error.hint


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "DATABASE_URL", "WEB_CONCURRENCY"))}
    env.update(
        {"MYAPP_VAR_DIR": str(tmp_path), "DJANGO_SECRET_KEY": "checks", "DJANGO_SETTINGS_MODULE": "config.settings"},
        **extra,
    )
    return env


def test_unknown_backend_env_fails_at_start_up(tmp_path):
    """manage.py refuses to start with an unknown MYAPP_BROKER_BACKEND and names the choices."""
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE,
        env=_env(tmp_path, MYAPP_BROKER_BACKEND="rabbit"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "MYAPP_BROKER_BACKEND='rabbit': use one of redis, redis_cluster, postgres, memory" in result.stderr


def _gunicorn(tmp_path, *args, **extra):
    env = _env(tmp_path, MYAPP_BROKER_BACKEND="memory", GUNICORN_BIND=f"127.0.0.1:{free_port()}", **extra)
    return subprocess.run(
        [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py", *args, "config.wsgi"],
        cwd=BASE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "extra"),
    [((), {}), (("-w", "2"), {"WEB_CONCURRENCY": "1"})],
    ids=["config default of 2 workers", "-w 2 over WEB_CONCURRENCY=1"],
)
def test_gunicorn_refuses_memory_broker_with_two_workers(tmp_path, args, extra):
    """gunicorn workers check the worker count gunicorn really started, and stop the server rather than split events."""
    result = _gunicorn(tmp_path, *args, **extra)
    assert result.returncode != 0
    assert "myapp.E002" in result.stderr and "gunicorn runs 2 workers" in result.stderr
