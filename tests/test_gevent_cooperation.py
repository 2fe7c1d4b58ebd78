"""Under gevent, waiting on a broker never blocks the worker: a ticker greenlet keeps its rhythm.

gevent patching is process-wide, so each case runs in a subprocess (as psycopg's
own tests/test_gevent.py does). The subprocess prints the longest gap between
10 ms ticks while the listener waits 1 s for notifications and while a 1 s
server-side wait runs (pg_sleep / BLPOP).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BASE = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    if os.environ.get("IMPORT_PSYCOPG_FIRST"):
        import psycopg  # imported before patching, as a preloaded app would
    from gevent import monkey
    monkey.patch_all()
    import gevent
    import django
    django.setup()
    from myapp.brokers import get_broker

    gaps = []
    def ticker():
        last = time.monotonic()
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    broker = get_broker()
    listener = broker.listener("!hub:cooperation")
    ticking = gevent.spawn(ticker)
    gevent.sleep(0.05)
    results = {}

    gaps.clear()
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        listener.wait(1.0 - (time.monotonic() - started))
    gevent.sleep(0.05)  # let the ticker record the gap that ends now
    results["listener_wait"] = max(gaps)

    gaps.clear()
    if os.environ["MYAPP_BROKER_BACKEND"] == "postgres":
        from django.db import connection
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(1)")
    else:
        import redis
        redis.Redis.from_url(os.environ["REDIS_URL"]).blpop(["cooperation-never"], timeout=1)
    gevent.sleep(0.05)
    results["slow_query"] = max(gaps)
    results["ticks"] = len(gaps)
    ticking.kill()
    listener.close()
    print(json.dumps(results))
    """
)


def run_case(env):
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**env, "DJANGO_SETTINGS_MODULE": "config.settings", "PYTHONPATH": str(BASE)},
        cwd=BASE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture
def base_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MYAPP_", "PSYCOPG_", "DATABASE_URL"))}
    env["MYAPP_VAR_DIR"] = str(tmp_path)
    env["DJANGO_SECRET_KEY"] = "cooperation"
    return env


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"IMPORT_PSYCOPG_FIRST": "1", "PSYCOPG_WAIT_FUNC": "wait_poll"},
    ],
    ids=["imported after patching", "imported before patching with wait_poll (myapp.gunicorn)"],
)
def test_postgres_broker_cooperates(base_env, postgres_server, variant):
    """The PostgreSQL listener's wait and a 1 s query leave other greenlets running (gaps < 100 ms)."""
    env = {**base_env, **variant, "MYAPP_BROKER_BACKEND": "postgres", "DATABASE_URL": postgres_server.url("postgres")}
    results = run_case(env)
    assert results["listener_wait"] < 0.1, results
    assert results["slow_query"] < 0.1, results
    assert results["ticks"] > 50, results


def test_postgres_without_patch_aware_import_blocks(base_env, postgres_server):
    """Control: psycopg imported before patching, without wait_poll, blocks the worker (why the setting exists)."""
    env = {
        **base_env,
        "IMPORT_PSYCOPG_FIRST": "1",
        "MYAPP_BROKER_BACKEND": "postgres",
        "DATABASE_URL": postgres_server.url("postgres"),
    }
    results = run_case(env)
    assert results["slow_query"] > 0.5, results


def test_redis_broker_cooperates(base_env, valkey_server):
    """The Redis listener's wait and a 1 s blocking command leave other greenlets running."""
    env = {**base_env, "MYAPP_BROKER_BACKEND": "redis", "REDIS_URL": valkey_server.url}
    results = run_case(env)
    assert results["listener_wait"] < 0.1, results
    assert results["slow_query"] < 0.1, results
    assert results["ticks"] > 50, results
